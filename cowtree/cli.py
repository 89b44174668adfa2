"""The cowtree command line.

Only click and the light :mod:`cowtree.operands` and :mod:`cowtree.output`
are imported at start-up,
so ``cowtree --help`` loads no engine code; each command imports what it
needs when it runs.  Every failure reaches :func:`main`, and
:func:`describe_error` turns it into one message line and an exit status.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import sys

import click

from . import __version__
from .operands import parse_location, parse_size
from .output import OutputError, StandardOutput

EXIT_OK = 0
EXIT_FAILURE = 1          # an operation failed: missing path, no space, permission, ...
EXIT_USAGE = 2            # invalid command line (click's own status)
EXIT_BAD_IMAGE = 3        # not a cowtree image, corrupt, or a format this version cannot read
EXIT_IN_USE = 4           # another process holds the image's lock
EXIT_INTERNAL = 70        # a bug in cowtree: rerun with --debug for the traceback
EXIT_INTERRUPTED = 130    # interrupted by Ctrl-C; the images stay at their last commit

EPILOG = """\b
Exit statuses: 0 success, 1 an operation failed, 2 invalid command line,
3 not a cowtree image or a damaged one, 4 image in use by another process,
70 internal error, 130 interrupted.  A failed command leaves every image
at its last commit."""

log = logging.getLogger("cowtree")
_debug = False


class SizeParam(click.ParamType):
    """A byte count with an optional K, M, G or T suffix (powers of 1024)."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()


class SecondsParam(click.ParamType):
    """A finite number of seconds above 0, such as 5 or 0.5."""

    name = "SECONDS"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = None
        if seconds is None or not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a finite number of seconds above 0, such as 5 or 0.5", param, ctx)
        return seconds


def warn(message: str) -> None:
    sys.stderr.write(f"cowtree: {message}\n")


def _out() -> StandardOutput:
    return StandardOutput(sys.stdout.buffer)


def _report(exc: BaseException) -> None:
    """Print the message of an error in one operand; the command goes on with the next."""
    warn(describe_error(exc)[0])


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("-v", "--verbose", is_flag=True, help="Report commits and copy totals on stderr.")
@click.option("--debug", is_flag=True, help="Log debug messages and print a traceback on errors.")
@click.option("--base", "base_override", type=click.Path(dir_okay=False), metavar="BASE",
              help="The base image file of the overlay this command opens, when it has moved; "
                   "a command that changes the overlay records the new place.")
@click.version_option(__version__, prog_name="cowtree")
def cli(verbose: bool, debug: bool, base_override: str | None) -> None:
    """Work with cowtree images: copy-on-write B-tree filesystems held in one file.

    A path inside an image is written IMAGE:/path, and a path inside a
    snapshot IMAGE@NAME:/path.  Commands that change an image run as one
    transaction: committed at the end, or dropped on any error.
    """
    global _debug
    _debug = debug
    if base_override is not None:
        os.environ["COWTREE_BASE"] = base_override
    level = logging.WARNING
    if verbose:
        level = logging.INFO
    if debug:
        level = logging.DEBUG
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="cowtree: %(name)s: %(message)s" if debug else "cowtree: %(message)s")


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--size", type=SIZE, default="0", show_default=True,
              help="Size limit of the image in bytes (K, M, G, T suffixes); 0 lets it grow.")
@click.option("--node-size", type=SIZE, default="16K", show_default=True,
              help="B-tree node size in bytes: a power of two from 4K to 64K.")
@click.option("--label", default="", help="Label stored in the superblock, at most 64 bytes.")
@click.option("--force", is_flag=True, help="Overwrite an existing non-empty file.")
@click.option("--base", type=click.Path(dir_okay=False, exists=True), metavar="BASE",
              help="Make IMAGE an overlay on the read-only image BASE: it starts with BASE's content "
                   "and records only changes.")
def mkfs(image: str, size: int, node_size: int, label: str, force: bool, base: str | None) -> None:
    """Create an empty image file IMAGE, or an overlay on a base image."""
    from . import commands
    from .operands import CommandError
    if not force and os.path.isfile(image) and os.path.getsize(image) > 0:
        raise CommandError(None, image, message=f"{image}: file exists and is not empty; use --force to overwrite it")
    try:
        result = commands.mkfs(image, size, node_size, label, force, base)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    log.info("created %s: uuid %s, node size %d, size limit %s", image, result["uuid"], result["node_size"],
             result["size_limit"] or "none")


@cli.command(epilog=EPILOG)
@click.option("-l", "long", is_flag=True, help="Long listing, like ls -l.")
@click.option("-a", "show_all", is_flag=True, help="Include names starting with '.', and '.' and '..'.")
@click.option("-R", "recursive", is_flag=True, help="List subdirectories recursively.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of objects: name, path, type, mode, size, nlink, uid, gid, mtime_ns, "
                   "ino, and target for symlinks.")
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE[:/PATH]...")
def ls(long: bool, show_all: bool, recursive: bool, as_json: bool, operands: tuple) -> int:
    """List directories inside images (the root when no path is given).

    As in coreutils ls, files named as operands come first, then the
    directories, each group sorted by name.  With -R or several operands
    each directory gets a header line: its path inside the image (/dir:)
    when there is one operand, IMAGE:/dir: when there are several.
    """
    from . import commands
    return commands.ls(list(operands), long, show_all, recursive, as_json, _out(), _report)


@cli.command(epilog=EPILOG)
@click.option("-r", "-R", "--recursive", "recursive", is_flag=True, help="Copy directories recursively.")
@click.option("-a", "--archive", "archive", is_flag=True,
              help="Same as -r, and keep modes, owners, times, symlinks, hard links, xattrs and holes.")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Leave out entries whose name matches this shell pattern; may be repeated.")
@click.option("--reflink", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Share data extents between source and copy inside one image: always (fail across "
                   "images), auto (share where possible) or never (copy the bytes).  --reflink alone means always.")
@click.argument("paths", nargs=-1, required=True, metavar="SRC... DST")
def cp(recursive: bool, archive: bool, excludes: tuple, reflink: str, paths: tuple) -> int:
    """Copy files between the host and images, or between images.

    Each of SRC and DST is a host path or IMAGE:/path.  A source whose last
    component is '/' or '.' has its contents copied into DST.  Without -r a
    symlink given as SRC is followed; with -r or -a it is copied as a link.
    """
    if len(paths) < 2:
        raise click.UsageError(f"missing destination file operand after '{paths[0]}'")
    *sources, dest = paths
    if parse_location(dest) is None and all(parse_location(text) is None for text in sources):
        raise click.UsageError("at least one of SRC and DST must be an image path (IMAGE:/path)")
    from . import commands
    from .copying import CopyOptions
    options = CopyOptions(recursive=recursive or archive, preserve=archive, excludes=excludes, reflink=reflink)
    return commands.cp(list(sources), dest, options, warn, sys.stderr.isatty())


@cli.command(epilog=EPILOG)
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE:/PATH...")
def cat(operands: tuple) -> int:
    """Write the contents of files inside images to standard output."""
    from . import commands
    return commands.cat(list(operands), _out(), _report)


def _octal_mode(ctx, param, value):
    if value is None:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise click.BadParameter(f"invalid mode {value!r}: expected octal digits such as 755") from None
    if mode > 0o7777:
        raise click.BadParameter(f"invalid mode {value!r}: at most 7777")
    return mode


@cli.command(epilog=EPILOG)
@click.option("-p", "--parents", is_flag=True, help="Create missing parents; an existing directory is no error.")
@click.option("-m", "--mode", callback=_octal_mode, help="Permission bits in octal (default: 777 less the umask).")
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE:/PATH...")
def mkdir(parents: bool, mode: int | None, operands: tuple) -> int:
    """Create directories inside an image."""
    from . import commands
    return commands.mkdir(list(operands), parents, mode, _report)


@cli.command(epilog=EPILOG)
@click.option("-r", "-R", "--recursive", "recursive", is_flag=True, help="Remove directories and their contents.")
@click.option("-f", "--force", is_flag=True, help="Ignore paths that do not exist.")
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE:/PATH...")
def rm(recursive: bool, force: bool, operands: tuple) -> int:
    """Remove files, or with -r whole trees, inside an image."""
    from . import commands
    return commands.rm(list(operands), recursive, force, _report)


@cli.command(epilog=EPILOG)
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE:/PATH...")
def rmdir(operands: tuple) -> int:
    """Remove empty directories inside an image."""
    from . import commands
    return commands.rmdir(list(operands), _report)


@cli.command(epilog=EPILOG)
@click.argument("paths", nargs=-1, required=True, metavar="IMAGE:/SRC... IMAGE:/DST")
def mv(paths: tuple) -> None:
    """Rename or move entries inside one image.

    When DST is an existing directory the sources move into it.
    """
    if len(paths) < 2:
        raise click.UsageError(f"missing destination file operand after '{paths[0]}'")
    from . import commands
    commands.mv(list(paths[:-1]), paths[-1])


@cli.command(epilog=EPILOG)
@click.option("-s", "--symbolic", is_flag=True, help="Make a symbolic link whose target is TARGET as written.")
@click.argument("target")
@click.argument("link", metavar="IMAGE:/LINK")
def ln(symbolic: bool, target: str, link: str) -> None:
    """Make a hard link to TARGET (IMAGE:/path in the same image), or with -s a symbolic link."""
    from . import commands
    commands.ln(target, link, symbolic)


@cli.command(epilog=EPILOG)
@click.option("-L", "--dereference", "follow", is_flag=True, help="Follow symlinks.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with every inode field.")
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE:/PATH...")
def stat(follow: bool, as_json: bool, operands: tuple) -> int:
    """Show the inode of entries inside an image, like coreutils stat."""
    from . import commands
    return commands.stat(list(operands), follow, as_json, _out(), _report)


@cli.command(epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON with used_bytes, free_bytes, image_bytes, size_limit and more.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def df(as_json: bool, images: tuple) -> None:
    """Show how much space an image uses and has left."""
    from . import commands
    commands.df(list(images), as_json, _out())


@cli.command(epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the same fields as JSON.")
@click.option("--chain", is_flag=True, help="List the image and its base images, top first.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def info(as_json: bool, chain: bool, images: tuple) -> int:
    """Show the superblock in use, both superblock copies and the root of every tree."""
    from . import commands
    return commands.info(list(images), as_json, _out(), chain, _report)


MOUNT_OPTIONS = ("ro", "rw", "allow_other")


@cli.command(epilog=EPILOG)
@click.argument("image", metavar="IMAGE[@SNAPSHOT]")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-o", "options", multiple=True, metavar="OPTION[,OPTION...]",
              help="Mount options: ro (read-only), rw, allow_other (let other users in).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground and log to stderr until unmounted.")
@click.option("--commit-interval", type=SecondsParam(), default=5.0, show_default=True,
              help="Seconds between commits of the running transaction: a finite number above 0.")
def mount(image: str, mountpoint: str, options: tuple, foreground: bool, commit_interval: float) -> None:
    """Mount IMAGE (or its snapshot NAME, read-only) at MOUNTPOINT through FUSE.

    Without --foreground the command returns once the mount works, and a
    background process serves it until `cowtree umount MOUNTPOINT`.  Changes
    are committed every --commit-interval seconds, on fsync and at unmount.
    SIGINT, SIGTERM and SIGHUP to the serving process unmount the same way.
    Snapshots appear read-only under MOUNTPOINT/.snapshots/NAME.
    """
    readonly = False
    allow_other = False
    for word in (word for option in options for word in option.split(",") if word):
        if word not in MOUNT_OPTIONS:
            raise click.BadParameter(f"unknown mount option '{word}': expected one of {', '.join(MOUNT_OPTIONS)}",
                                     param_hint="-o")
        if word == "allow_other":
            allow_other = True
        else:
            readonly = word == "ro"   # the last of ro and rw wins, as with mount(8)
    from .fuse import MountOptions, split_image_spec
    from .fuse import mount as fuse_mount
    path, snapshot = split_image_spec(image)
    fuse_mount(MountOptions(path, mountpoint, snapshot, readonly=readonly, allow_other=allow_other,
                            commit_interval=commit_interval), foreground=foreground)


@cli.command(epilog=EPILOG)
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-z", "--lazy", is_flag=True, help="Detach now and finish the unmount once the mount is no longer busy.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount a cowtree FUSE mount (with fusermount3 -u); the mount commits before it exits."""
    from .fuse import umount as fuse_umount
    fuse_umount(mountpoint, lazy)


# ---------------------------------------------------------------------------
# Errors


def reason_of(exc: BaseException) -> str:
    """Return the coreutils-style reason for an error: the strerror text, plus any detail."""
    from .errors import CowtreeError
    if isinstance(exc, OSError) and exc.errno:
        strerror = os.strerror(exc.errno)
        if isinstance(exc, CowtreeError):
            text = str(exc)
            return text if strerror.lower() in text.lower() else f"{strerror} ({text})"
        return exc.strerror or strerror
    if isinstance(exc, CowtreeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _FsckCommand(click.Command):
    """A command whose invalid command line exits 4, because fsck gives 2 to "errors remain"."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            exc.exit_code = 4
            raise


@cli.command(cls=_FsckCommand)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--repair", is_flag=True, help="Fix leaks, reference counts, link counts, directory sizes, "
              "orphan inodes and dangling entries through normal transactions.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON document.")
@click.option("-v", "--verbose", is_flag=True, help="Also print the superblock copies and the time taken.")
@click.option("--no-data", is_flag=True, help="Skip reading data blocks; check metadata only.")
def fsck(image: str, repair: bool, as_json: bool, verbose: bool, no_data: bool) -> int:
    """Check IMAGE for consistency and list every problem found.

    Exit statuses: 0 clean, 1 problems found and all repaired, 2 errors
    remain, 3 only leaked space remains, 4 the image could not be opened
    or the command line is invalid.
    """
    from .fsck import EXIT_OPERATIONAL, run
    out = StandardOutput(sys.stdout)
    try:
        status = run(image, repair=repair, as_json=as_json, verbose=verbose, data=not no_data, out=out)
        out.flush()
    except OutputError as exc:
        exc.exit_status = EXIT_OPERATIONAL
        raise
    return status


def status_of(exc: BaseException) -> int:
    from .errors import (CorruptionError, CowtreeError, ImageInUseError, NotAnImageError,
                         UnsupportedFeatureError)
    if isinstance(exc, ImageInUseError):
        return EXIT_IN_USE
    if isinstance(exc, (CorruptionError, NotAnImageError, UnsupportedFeatureError)):
        return EXIT_BAD_IMAGE
    if isinstance(exc, (CowtreeError, OSError)):
        return EXIT_FAILURE
    return EXIT_INTERNAL


def describe_error(exc: BaseException) -> tuple[str, int]:
    """Turn any error a command raised into (message without the 'cowtree: ' prefix, exit status)."""
    from .operands import CommandError
    if isinstance(exc, CommandError):
        head = exc.head()
        if exc.cause is None:
            return head, EXIT_FAILURE
        return f"{head}: {reason_of(exc.cause)}", status_of(exc.cause)
    status = status_of(exc)
    if status == EXIT_INTERNAL:
        return f"internal error: {reason_of(exc)} (rerun with --debug for the traceback)", status
    if isinstance(exc, OSError) and exc.filename is not None and not str(exc).startswith(str(exc.filename)):
        return f"{exc.filename}: {reason_of(exc)}", status
    return reason_of(exc), status


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    from . import tune_gc
    tune_gc()
    args = list(sys.argv[1:] if argv is None else argv)
    # "--reflink" alone means "--reflink=always", as in coreutils cp; click
    # would take the next argument as its value.
    args = ["--reflink=always" if arg == "--reflink" else arg for arg in args]
    try:
        status = cli.main(args=args, prog_name="cowtree", standalone_mode=False)
        StandardOutput(sys.stdout).flush()
    except OutputError as exc:
        return _output_failed(exc)
    except click.exceptions.Abort:
        warn("interrupted")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except Exception as exc:  # every failure ends here once, as a message and an exit status
        if _debug:
            import traceback
            traceback.print_exc()
        message, status = describe_error(exc)
        warn(message)
        return status
    return status if isinstance(status, int) else EXIT_OK


def _output_failed(exc: OutputError) -> int:
    """Report a failed write to standard output as coreutils does, and return the exit status.

    A closed pipe (EPIPE) ends the process silently through SIGPIPE, as it
    ends coreutils cat under the default SIGPIPE action, so a shell reports
    status 141.  Python ignores SIGPIPE, so the default action is restored first.
    """
    # Output still buffered must not fail again in the flush at exit.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)

    # NOTE: coreutils that inherit an ignored SIGPIPE print "write error:
    # Broken pipe" and exit 1 instead.  Python sets SIGPIPE to ignored before
    # any of this code runs, so the inherited action is unknown here.
    if exc.cause.errno == errno.EPIPE:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        return 128 + signal.SIGPIPE   # reached only while SIGPIPE is blocked
    warn(f"write error: {reason_of(exc.cause)}")
    return exc.exit_status


def _register_more_commands() -> None:
    from .cli_volumes import register
    register(cli)


_register_more_commands()
