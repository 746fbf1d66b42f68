"""Where trials land: the worker entry point and the reporters that connect a trial to the world."""
