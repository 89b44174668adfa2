"""Commands for subvolumes and layers: snapshot, du, commit, rebase, convert.

Like :mod:`cowtree.cli`, this module imports only click at start-up; each
command imports the engine when it runs.  :func:`register` adds the
commands to the main group.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import click

log = logging.getLogger("cowtree")


def _out():
    from .output import StandardOutput
    return StandardOutput(sys.stdout.buffer)


def _write_json(value) -> None:
    _out().write(json.dumps(value, indent=2).encode() + b"\n")


def _name(text: str) -> bytes:
    import os
    return os.fsencode(text)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


@click.group()
def snapshot() -> None:
    """Create, list, delete and roll back to snapshots of an image's live filesystem.

    A snapshot is read-only unless made with --writable (a clone).  Its
    files are reached as IMAGE@NAME:/path in every command that takes a path.
    """


@snapshot.command("create")
@click.option("--from", "source", metavar="SNAPSHOT", help="Snapshot this snapshot instead of the live filesystem.")
@click.option("--writable", is_flag=True, help="Make a writable clone instead of a read-only snapshot.")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("name")
def snapshot_create(source: str | None, writable: bool, image: str, name: str) -> None:
    """Snapshot the live filesystem of IMAGE as NAME; it costs the same whatever the tree's size."""
    from . import subvolume
    from .operands import CommandError
    from .session import Session
    with Session() as session:
        volume = session.open(image, writable=True).volume
        try:
            sub = subvolume.create_snapshot(volume, _name(name), _name(source) if source else None, writable)
        except OSError as exc:
            raise CommandError("cannot create snapshot", f"{image}@{name}", exc) from exc
        log.info("created %s '%s' (id %d, generation %d)", "clone" if writable else "snapshot", name,
                 sub.tree_id, sub.item.created_gen)


@snapshot.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of objects with the same fields and the UUIDs.")
@click.option("--no-usage", is_flag=True, help="Skip the exclusive and shared byte counts (faster).")
@click.option("--uuids", is_flag=True, help="Add each snapshot's UUID, its parent's UUID and the UUID it was "
              "received from ('-' for none).")
@click.argument("image", type=click.Path(dir_okay=False))
def snapshot_list(as_json: bool, no_usage: bool, uuids: bool, image: str) -> None:
    """List the snapshots of IMAGE with their space use.

    EXCLUSIVE bytes are freed by deleting that snapshot alone; SHARED bytes
    are also used by another snapshot or the live filesystem.
    """
    from . import subvolume
    from .session import Session
    with Session() as session:
        volume = session.open(image, writable=False).volume
        counter = subvolume.UsageCounter(volume)
        rows = []
        for sub in subvolume.list_subvolumes(volume, include_deleting=True):
            if sub.tree_id == subvolume.LIVE:
                continue
            usage = None if no_usage or sub.deleting else counter.subvolume(sub.tree_id)
            rows.append({
                "name": sub.display_name if not sub.deleting else None,
                "id": sub.tree_id,
                "parent": sub.item.parent_id,
                "created_ns": sub.item.created_ns,
                "generation": sub.item.created_gen,
                "readonly": sub.readonly,
                "deleting": sub.deleting,
                "exclusive_bytes": usage.exclusive if usage else None,
                "shared_bytes": usage.shared if usage else None,
                "uuid": subvolume.format_uuid(sub.identity.uuid),
                "parent_uuid": subvolume.format_uuid(sub.identity.parent_uuid),
                "received_uuid": subvolume.format_uuid(sub.identity.received_uuid),
            })
    if as_json:
        _write_json(rows)
        return
    out = _out()
    heading = "NAME                 ID   PARENT GEN      CREATED              RO  EXCLUSIVE     SHARED"
    if uuids:
        heading += f"  {'UUID':<36}  {'PARENT UUID':<36}  RECEIVED UUID"
    out.write(heading.encode() + b"\n")
    for row in rows:
        name = row["name"] if row["name"] is not None else "(deleting)"
        exclusive = "-" if row["exclusive_bytes"] is None else str(row["exclusive_bytes"])
        shared = "-" if row["shared_bytes"] is None else str(row["shared_bytes"])
        line = (f"{name:<20} {row['id']:<4} {row['parent']:<6} {row['generation']:<8} "
                f"{_when(row['created_ns'])}  {'yes' if row['readonly'] else 'no':<3} {exclusive:>9} {shared:>10}")
        if uuids:
            line += f"  {row['uuid']:<36}  {row['parent_uuid']:<36}  {row['received_uuid']}"
        out.write(line.encode("utf-8", "surrogateescape") + b"\n")


@snapshot.command("delete")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("names", nargs=-1, required=True)
def snapshot_delete(image: str, names: tuple) -> None:
    """Delete snapshots, freeing the space no other snapshot uses.

    A large deletion is committed in steps and resumes after a crash the next
    time the image is changed.
    """
    from . import subvolume
    from .operands import CommandError
    from .session import Session
    show = sys.stderr.isatty()

    def progress(nodes: int, done: bool) -> None:
        if show:
            sys.stderr.write(f"\rcowtree: freed {nodes} nodes{' (done)' if done else ''}   ")
            if done:
                sys.stderr.write("\n")

    names = tuple(dict.fromkeys(names))   # a name given twice is deleted once
    with Session() as session:
        volume = session.open(image, writable=True).volume
        # Every name is looked up before anything is deleted, so that a typo
        # deletes nothing.
        for name in names:
            try:
                sub = subvolume.find(volume, _name(name))
            except OSError as exc:
                raise CommandError("cannot delete snapshot", f"{image}@{name}", exc) from exc
            if sub.tree_id == subvolume.LIVE:
                raise CommandError(None, image, message=f"cannot delete snapshot '{image}@{name}': "
                                                        f"invalid snapshot name")
        for name in names:
            try:
                subvolume.delete_subvolume(volume, _name(name), progress)
            except OSError as exc:
                raise CommandError("cannot delete snapshot", f"{image}@{name}", exc) from exc


@snapshot.command("rollback")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("name")
def snapshot_rollback(image: str, name: str) -> None:
    """Make the live filesystem of IMAGE hold what snapshot NAME holds.

    Changes to the live filesystem since then are discarded.
    """
    from . import subvolume
    from .operands import CommandError
    from .session import Session
    with Session() as session:
        volume = session.open(image, writable=True).volume
        try:
            subvolume.rollback(volume, _name(name))
        except OSError as exc:
            raise CommandError("cannot roll back to", f"{image}@{name}", exc) from exc


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON with total_bytes, exclusive_bytes, shared_bytes.")
@click.argument("operands", nargs=-1, required=True, metavar="IMAGE[@NAME][:/PATH]...")
def du(as_json: bool, operands: tuple) -> None:
    """Show the file data a subvolume or path references: in total, alone, and shared.

    Like btrfs filesystem du: SHARED bytes are also referenced by a snapshot,
    a clone or a reflink copy; EXCLUSIVE bytes by nothing else.
    """
    from . import subvolume
    from .operands import CommandError, parse_image_operand
    from .session import Session
    rows = []
    with Session() as session:
        counters = {}
        for text in operands:
            location = parse_image_operand(text)
            fs = session.filesystem(location)
            counter = counters.setdefault(location.image, subvolume.UsageCounter(fs.vol))
            try:
                ino = fs.resolve(location.path)
                usage = counter.path(fs, ino)
            except OSError as exc:
                raise CommandError("cannot access", text, exc) from exc
            rows.append({"path": str(location), "total_bytes": usage.total, "exclusive_bytes": usage.exclusive,
                         "shared_bytes": usage.shared})
    if as_json:
        _write_json(rows)
        return
    out = _out()
    out.write(b"     TOTAL  EXCLUSIVE     SHARED  PATH\n")
    for row in rows:
        out.write(f"{row['total_bytes']:>10} {row['exclusive_bytes']:>10} {row['shared_bytes']:>10}  {row['path']}\n"
                  .encode("utf-8", "surrogateescape"))


@click.command("commit")
@click.option("--force", is_flag=True,
              help="Commit even when other overlays found beside the base or the overlay depend on them.")
@click.argument("overlay", type=click.Path(dir_okay=False))
def commit_overlay(force: bool, overlay: str) -> None:
    """Merge the changes of overlay image OVERLAY down into its base image.

    The overlay is then empty again, on the updated base.  Other overlays
    made on the same base, and overlays made on OVERLAY, are refused from
    then on, since the image below them has changed (as with qemu-img
    commit).  Without --force, finding any of them in the directory of the
    base or of the overlay stops the commit.  The base must not be open
    elsewhere.
    """
    from . import layers
    from .operands import CommandError
    try:
        base, changed = layers.commit_to_base(overlay, force)
    except OSError as exc:
        raise CommandError("cannot commit", overlay, exc) from exc
    log.info("committed %d changed items of %s into %s", changed, overlay, base)


@click.command()
@click.option("--base", "new_base", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The new base image; it should hold nearly the content of the old one.")
@click.argument("overlay", type=click.Path(dir_okay=False))
def rebase(new_base: str, overlay: str) -> None:
    """Move overlay image OVERLAY onto another base, keeping what it shows.

    Only items that differ from the new base stay in the overlay.
    """
    from . import layers
    from .operands import CommandError
    try:
        changed = layers.rebase(overlay, new_base)
    except OSError as exc:
        raise CommandError("cannot rebase", overlay, exc) from exc
    log.info("rebased %s onto %s: %d items differ from the new base", overlay, new_base, changed)


@click.command()
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
def convert(force: bool, image: str, output: str) -> None:
    """Write a standalone image OUTPUT holding IMAGE's live filesystem, with no base.

    Snapshots are not copied.
    """
    import os

    from . import layers
    from .operands import CommandError
    from .session import Session
    if os.path.exists(output) and os.path.getsize(output) > 0 and not force:
        raise CommandError(None, output, message=f"{output}: file exists and is not empty; use --force to overwrite it")
    from .image import same_file_key
    with Session() as session:
        volume = session.open(image, writable=False).volume
        target = same_file_key(output)
        for layer in volume.layers:
            st = layer.dev.stat()
            if (st.st_dev, st.st_ino) == target:
                raise CommandError(None, output, message=f"cannot convert '{image}' into '{output}': "
                                                         f"'{output}' is {image} or one of its base images")
        try:
            layers.convert(volume, output, force=True).close()
        except OSError as exc:
            raise CommandError("cannot convert", image, exc) from exc


def _prefixed(prefix: str, exc):
    """Return the CommandError exc with its message starting with "prefix: "."""
    exc.message = f"{prefix}: {exc.head()}"
    return exc


@click.command("send")
@click.option("-p", "--parent", metavar="PARENT",
              help="Send only what differs from PARENT, another read-only snapshot of IMAGE.  The receiving "
                   "image must already hold PARENT, received from IMAGE or from its stream.")
@click.option("-f", "--file", "output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the stream to FILE instead of standard output.")
@click.argument("source", metavar="IMAGE@SNAP")
def send_command(parent: str | None, output: str | None, source: str) -> None:
    """Write read-only snapshot SNAP of IMAGE as a send stream to standard output or FILE.

    `cowtree receive` turns the stream into a snapshot of another image.
    Standard output must not be a terminal.  The image is only read.
    """
    import os

    from . import send
    from .errors import CowtreeError
    from .image import same_file_key
    from .operands import CommandError, parse_image_operand
    from .session import Session
    location = parse_image_operand(source)
    if location.snapshot is None or location.path != b"/":
        raise click.UsageError(f"expected IMAGE@SNAP, a read-only snapshot, not '{source}'")
    if output is None and sys.stdout.isatty():
        raise CommandError(None, source, message="send: not writing a send stream to a terminal; redirect "
                                                 "standard output or use -f FILE")
    with Session() as session:
        try:
            volume = session.open(location.image, writable=False).volume
        except CommandError as exc:
            raise _prefixed("send", exc) from exc
        target = same_file_key(output) if output is not None else None
        if target is not None and any((layer.dev.stat().st_dev, layer.dev.stat().st_ino) == target
                                      for layer in volume.layers):
            raise CommandError(None, output, message=f"send: '{output}' is {location.image} or one of its base "
                                                     f"images; not overwriting it with a stream")
        # Only a file that this send creates is removed again when it fails.
        created = output is not None and not os.path.lexists(output)
        try:
            out = open(output, "wb") if output is not None else _out()
        except OSError as exc:
            raise CommandError(None, output, exc, message=f"send: cannot create '{output}'") from exc
        try:
            stats = send.send(volume, _name(location.snapshot), out,
                              parent=_name(parent) if parent is not None else None)
            out.flush()
        except BrokenPipeError as exc:
            # The reader went away; keep Python from reporting the pipe again at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise CommandError(None, source, exc, message=f"send: {source}: writing the stream failed") from exc
        except (OSError, CowtreeError) as exc:
            if output is not None:
                out.close()
                if created:
                    os.unlink(output)
            raise CommandError(None, source, exc, message=f"send: {source}") from exc
        finally:
            if output is not None and not out.closed:
                out.close()
    log.info("sent %s: %d records, %d bytes (%d of file data)", source, stats.records, stats.bytes,
             stats.data_bytes)


@click.command("receive")
@click.option("-f", "--file", "input_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Read the stream from FILE instead of standard input.")
@click.argument("image", type=click.Path(dir_okay=False))
def receive_command(input_path: str | None, image: str) -> None:
    """Read a send stream and add its snapshot to IMAGE, read-only, under the name it was sent with.

    An incremental stream (send -p) needs the snapshot received from its
    parent.  Everything happens in one transaction: on any error IMAGE
    stays at its last commit.
    """
    from . import receive
    from .errors import CowtreeError
    from .operands import CommandError
    from .session import Session
    if input_path is None and sys.stdin.isatty():
        raise CommandError(None, image, message="receive: not reading a send stream from a terminal; redirect "
                                                "standard input or use -f FILE")
    try:
        infile = open(input_path, "rb") if input_path is not None else sys.stdin.buffer
    except OSError as exc:
        raise CommandError(None, input_path, exc, message=f"receive: cannot open '{input_path}'") from exc
    try:
        with Session() as session:
            try:
                volume = session.open(image, writable=True).volume
            except CommandError as exc:
                raise _prefixed("receive", exc) from exc
            try:
                sub = receive.receive(volume, infile)
            except (OSError, CowtreeError) as exc:
                raise CommandError(None, image, exc, message=f"receive: {image}") from exc
    finally:
        if input_path is not None:
            infile.close()
    log.info("received snapshot '%s' into %s", sub.display_name, image)


def register(group: click.Group) -> None:
    for command in (snapshot, du, commit_overlay, rebase, convert, send_command, receive_command):
        group.add_command(command)
