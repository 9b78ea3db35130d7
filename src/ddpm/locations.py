"""The values that name a file, a folder or a URL (data.url, data.source, fid.weights): what
check_params can know of them before any stage runs (and DVC deletes its outputs), and how a
message shows them.

A value that starts with `scheme://` is a URL: http and https are downloaded, file:// names a
local path, any other scheme is refused. Anything else is a local path (~ expanded), relative to
the repository root, where DVC runs the stages. Every problem is one ParamsError line naming the
key. A URL's credentials (`user:password@`) are never shown: mask() writes them as `***@`.
"""
from __future__ import annotations

import os
import re
import stat
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ddpm.errors import ParamsError
from ddpm.schema import short

DOWNLOADED = ("http", "https")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# A URL's user:password@ (greedy: a password may hold an unescaped @; not past the path)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s]*)@")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a URL


def mask(text: str, *urls: str) -> str:
    """`text` with the credentials of every URL in it written as ***@, and those of `urls` as
    *** wherever else they appear (urllib's errors quote a host with what precedes it)."""
    text = _USERINFO.sub(r"\1***@", text)
    for url in urls:
        for secret in credentials(url):
            text = text.replace(secret, "***")
    return text


def credentials(url: str) -> list[str]:
    """The secret parts of a URL's user:password@ (raw and unescaped), longest first; for a
    user alone (a token), the user."""
    found = _USERINFO.match(url)
    if not found:
        return []
    user, _, password = found[2].partition(":")
    secret = password or user
    parts = {found[2], unquote(found[2]), secret, unquote(secret)}
    return sorted((part for part in parts if part), key=len, reverse=True)


def shown(value: str) -> str:
    """A value as a message quotes it: its credentials masked, cut to one short line."""
    return short(mask(value))


def scheme(value: str) -> str | None:
    """The URL scheme a value starts with (lowercase), or None for a local path."""
    found = _SCHEME.match(value)
    return found[1].lower() if found else None


def is_url(value: str) -> bool:
    """An http(s) URL, which a stage downloads."""
    return scheme(value) in DOWNLOADED


def local_path(value: str) -> Path:
    """The path a local value names: file:// URLs unquoted, ~ expanded."""
    if scheme(value) == "file":
        return Path(urllib.request.url2pathname(urlsplit(value).path))
    return Path(value).expanduser()


def check_url(key: str, value: str) -> str:
    """An http(s) URL that urllib can fetch: it parses, names a host (and a numeric port), holds
    no space and no credentials (urllib sends none, and DVC would record them: docs/trust.md).
    Returns its path."""
    def refuse(why: str) -> ParamsError:
        return ParamsError(f"{key} = {shown(value)}: {why}")

    if _CONTROL.search(value):
        raise refuse("a URL holds no spaces or control characters (write a space as %20)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (parses the port: ValueError if it is not a number in range)
        host = parts.hostname
        if host:
            host.encode("idna")
    except (ValueError, UnicodeError) as e:
        raise refuse(f"not a valid URL ({mask(str(e), value)})") from None
    if "@" in parts.netloc:
        raise refuse("a user or password in a URL is refused: the download sends none, and DVC "
                     "records the value in dvc.lock and the experiment's commit. Download the "
                     f"file with your credentials and set {key} to its path (`git checkout "
                     "params.yaml` drops the value)")
    if not host:
        raise refuse("a URL names a host (http://host/path)")
    return parts.path


def check_local(key: str, value: str, folder: bool = False) -> Path:
    """A local path that exists and is a regular file (or, with folder=True, a folder): links
    are followed; a FIFO, socket or device is refused unopened. Returns the path."""
    def refuse(why: str) -> ParamsError:
        return ParamsError(f"{key} = {shown(value)}: {why}")

    what = "folder or file" if folder else "file"
    try:
        path = local_path(value)
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        unresolved = ("; params.yaml takes plain values: ${...} is resolved only by dvc exp run "
                      "-S (docs/trust.md)") if "${" in value else ""
        raise refuse(f"no such {what} here (a relative path starts at the repository root, "
                     f"where DVC runs the stages){unresolved}") from None
    except OSError as e:  # a name over the filesystem's limit, a link loop, no permission
        raise refuse(f"cannot be looked up ({e.strerror or e}); expected the path of a "
                     f"{what}") from None
    except (ValueError, RuntimeError) as e:  # a NUL character; ~user of no such user
        raise refuse(f"not a usable path ({e})") from None
    if stat.S_ISDIR(mode):
        if not folder:
            raise refuse("a folder; expected a file")
    elif not stat.S_ISREG(mode):
        kind = "neither a folder nor a regular file" if folder else "not a regular file"
        raise refuse(f"{kind} (a FIFO, socket or device), left unopened")
    elif not os.access(path, os.R_OK):
        raise refuse("not readable by this user")
    return path


def check_location(key: str, value: str, folder: bool = False, remote: bool = True) -> None:
    """check_url for http(s) URLs (if remote), check_local for the rest; another scheme
    (ftp://, s3://, ...) is refused."""
    kind = scheme(value)
    if kind in DOWNLOADED and remote:
        check_url(key, value)
    elif kind in (None, "file"):
        check_local(key, value, folder)
    else:
        takes = "an http(s) URL, a file:// URL or a local path" if remote else "a local path"
        raise ParamsError(f"{key} = {shown(value)}: expected {takes}; {kind}:// is not fetched "
                          "here (fetch the file first, e.g. with dvc import-url, and give its "
                          "path)")
