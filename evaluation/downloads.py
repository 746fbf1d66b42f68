"""Weights given as a URL (`eval.aesthetics_head`, `eval.fid_weights`): downloaded once into the
cache, `DREAMSWEEP_CACHE/downloads/<hash of the URL>/<file name>`.

Concurrent trials (processes on one node, or nodes on one shared cache) take a lock file beside
the target: one downloads, the others wait and then read its file. Each download streams into its
own temporary file and is renamed into place, so no reader sees a partial file and a crashed
download leaves nothing that looks finished. Torch-free, so `dreamsweep validate` can ask
whether a download is needed without importing torch.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from filelock import FileLock

from contract.cache import cache_key, cache_root

DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds without data before a download is given up."""
PROBE_TIMEOUT_S = 10.0
"""Seconds `download_problem` waits for the server's answer."""


def download_path(url: str) -> Path:
    """Where `cached_download(url)` puts the file (whether or not it is there yet)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    return cache_root() / "downloads" / cache_key(url) / name


def cached_download(url: str) -> Path:
    """The file at `url`, downloaded on first use; concurrent callers download it once."""
    target = download_path(url)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if target.is_file():  # downloaded by whoever held the lock before us
            return target
        handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        try:
            with (
                os.fdopen(handle, "wb") as out,
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            ):
                shutil.copyfileobj(response, out, length=1 << 20)
                # A connection closed mid-body reads as the end of the file: without this check
                # the first half of the weights would be cached as the weights.
                promised = response.headers.get("Content-Length")
                if promised is not None and out.tell() != int(promised):
                    raise ConnectionError(
                        f"the connection closed after {out.tell():,} of {int(promised):,} bytes"
                    )
            os.replace(staging, target)
        # OSError: URLError (HTTPError included), timeouts, resets and a body cut short;
        # HTTPException: an answer that is not HTTP.
        except (OSError, http.client.HTTPException) as err:
            raise OSError(
                f"cannot download {url} ({getattr(err, 'reason', err)}); on a machine without a "
                "network, download it elsewhere and give its path in the spec instead"
            ) from err
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    return target


class _MethodKeepingRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects with the request's own method. urllib's handler re-asks with GET,
    which would turn `download_problem`'s HEAD probe into a download of the whole file."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is not None:
            redirected.method = req.get_method()  # Request's public attribute; None = GET
        return redirected


def download_problem(url: str, field: str) -> str | None:
    """Why `url` (the value of `field`) cannot be had here, or None: it is in the cache, or
    its server answers. Asks with a HEAD request; downloads nothing."""
    if download_path(url).is_file():
        return None
    try:
        opener = urllib.request.build_opener(_MethodKeepingRedirectHandler)
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as err:
        if err.code not in (404, 410):  # e.g. 405: a server that takes no HEAD still serves GET
            return None
        reason = f"the server answers HTTP {err.code}"
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        reason = str(getattr(err, "reason", err))
    return (
        f"{field}: {url} is not in the cache ({download_path(url)}) and cannot be downloaded "
        f"from this machine ({reason}); download the file where there is a network and set "
        f"{field} to its path"
    )
