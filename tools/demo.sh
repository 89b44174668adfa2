#!/usr/bin/env bash
# The main job of cowtree, end to end: import this Python's standard library
# into a new image with `cowtree cp -a`, copy it back out, and check that
# nothing changed on the way (contents, modes, mtimes in ns, symlink targets).
# Then it snapshots the image, changes a file, checks that the snapshot still
# reads the old contents, lists the snapshots and ends with `cowtree fsck`,
# which must find the image clean.
#
# Usage: tools/demo.sh [WORKDIR]     (default: ./out/demo, replaced on each run)
# Exits non-zero on any mismatch, and when fsck does not find the image clean.
set -euo pipefail

workdir=${1:-./out/demo}
python=${PYTHON:-python3}
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
image="$workdir/stdlib.img"
exported="$workdir/exported"

step() { printf '\n== %s\n' "$*"; }
timed() {
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    awk -v start="$start" -v end="$end" 'BEGIN { printf "   (%.2f s)\n", end - start }'
}

command -v cowtree >/dev/null || { echo "demo: cowtree is not on PATH; run 'pip install -e .' first" >&2; exit 1; }

rm -rf "$workdir"
mkdir -p "$workdir"

step "create $image"
cowtree mkfs "$image"

step "import $stdlib (without site-packages)"
timed cowtree cp -a --exclude site-packages "$stdlib" "$image:/stdlib"

step "list the image"
cowtree ls -l "$image:/stdlib" | head -n 15
echo "   ... $(cowtree ls -R "$image:/stdlib" | grep -vc -e ':$' -e '^$') entries in all"

step "copy it back out to $exported"
timed cowtree cp -a "$image:/stdlib" "$exported"

step "compare contents with diff -r"
diff -r --no-dereference --exclude site-packages "$stdlib" "$exported"
echo "   identical"

step "compare modes, mtimes (ns) and symlink targets"
"$python" - "$stdlib" "$exported" <<'EOF'
import os
import stat
import sys

source, copy = sys.argv[1], sys.argv[2]
problems = 0
checked = 0
for dirpath, dirnames, filenames in os.walk(source):
    if dirpath == source and "site-packages" in dirnames:
        dirnames.remove("site-packages")
    names = dirnames + filenames
    if dirpath == source:
        names.append("")          # the top directory itself
    for name in names:
        original = os.path.join(dirpath, name) if name else dirpath
        copied = os.path.join(copy, os.path.relpath(original, source))
        a = os.lstat(original)
        b = os.lstat(copied)
        found = []
        if a.st_mode != b.st_mode:
            found.append(f"mode {b.st_mode:o} != {a.st_mode:o}")
        if a.st_mtime_ns != b.st_mtime_ns:
            found.append(f"mtime {b.st_mtime_ns} != {a.st_mtime_ns}")
        if stat.S_ISLNK(a.st_mode) and os.readlink(original) != os.readlink(copied):
            found.append("symlink target differs")
        if found:
            problems += 1
            print(f"   mismatch {copied}: {'; '.join(found)}")
        checked += 1
print(f"   {checked} entries checked, {problems} mismatches")
sys.exit(1 if problems else 0)
EOF

step "space"
cowtree df "$image"

step "snapshot, change a file, and read both versions"
cowtree snapshot create "$image" before
original=$(cowtree cat "$image:/stdlib/os.py" | sha256sum)
echo "# changed after the snapshot" > "$workdir/os.py"
cowtree cp "$workdir/os.py" "$image:/stdlib/os.py"
cowtree ls -l "$image@before:/stdlib/os.py"
cowtree ls -l "$image:/stdlib/os.py"
in_snapshot=$(cowtree cat "$image@before:/stdlib/os.py" | sha256sum)
live=$(cowtree cat "$image:/stdlib/os.py")
if [ "$in_snapshot" != "$original" ]; then
    echo "demo: the snapshot's os.py changed" >&2
    exit 1
fi
if [ "$live" != "# changed after the snapshot" ]; then
    echo "demo: the live os.py does not have the new contents" >&2
    exit 1
fi
echo "   the snapshot keeps the old os.py, the live filesystem has the new one"

step "list the snapshots"
cowtree snapshot list "$image"

step "check the image with fsck"
status=0
cowtree fsck "$image" || status=$?
if [ "$status" -ne 0 ]; then
    echo "demo: cowtree fsck exited with status $status; the image is not clean" >&2
    exit 1
fi

step "done: $image round-tripped the standard library, kept its snapshot and checked clean"
