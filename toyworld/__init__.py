"""The toy world: a procedural generator of 64 px images with captions and ground truth, an
oracle that judges images against that truth, and the pipeline that pretrains the `toy` models
(VAE, CLIP, UNet, aesthetic head) on it.

`toyworld.world`, `toyworld.scene`, `toyworld.render`, `toyworld.corrupt` and `toyworld.oracle`
need only numpy, PIL and torch; `toyworld.build` (the pretraining) also needs diffusers and
transformers.
"""
