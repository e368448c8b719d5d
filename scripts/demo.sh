#!/usr/bin/env bash
# The main job end to end on generated sample images (run by `make demo`):
# a golden image built the way cloud images are built (an ext4 file system made
# from a tree of files, converted to a compressed qcow2), an add-cow image over
# it, writes through it, then map, check, convert, compare, with QEMU doing the
# same job on a qcow2 overlay as referee; then the image served over NBD,
# streamed while served and detached by the server, leaving a standalone raw
# disk that e2fsck finds clean. One command is refused on purpose (announced
# before it runs, and checked to be refused).
set -euo pipefail
out=demo-out
rm -rf "$out" && mkdir -p "$out" && cd "$out"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Echo a command quoted as the shell needs it, so it can be pasted, then run it.
run() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }
# The first byte of a file of the ext4 file system in rootfs.raw (4 KiB blocks).
offset_of() { echo $(( $(debugfs -R "bmap $1 0" rootfs.raw 2>/dev/null) * 4096 )); }

say "1. A golden image, as cloud images are built: ext4 from a tree of files, then compressed qcow2"
mkdir -p tree/etc tree/usr/share/doc tree/usr/lib tree/data
echo golden > tree/etc/hostname
for i in $(seq 40); do seq "$((i * 300))" > "tree/usr/share/doc/file$i.txt"; done
head -c 4M /dev/urandom > tree/usr/lib/blob.bin
head -c 64k /dev/urandom > tree/data/pattern.bin      # rewritten with 0xab below
seq 4000 > tree/data/notes.txt                        # 5000 bytes of it become 0xcd
head -c 128k /dev/urandom > tree/data/zeroed.bin      # zeroed (write -z)
head -c 256k /dev/urandom > tree/data/discarded.bin   # one cluster of it discarded
head -c 64k /dev/urandom > tree/data/served.bin       # rewritten with 0xef over NBD
run mke2fs -q -t ext4 -b 4096 -L golden -d tree rootfs.raw 64M
# where those files' blocks are: the writes below change file contents, as a guest would
pattern=$(offset_of /data/pattern.bin); notes=$(offset_of /data/notes.txt)
zeroed=$(offset_of /data/zeroed.bin); served=$(offset_of /data/served.bin)
discarded=$(( ($(offset_of /data/discarded.bin) + 65535) / 65536 * 65536 ))  # a whole cluster
printf 'data/pattern.bin at %d, notes.txt at %d, zeroed.bin at %d, discarded.bin has a cluster at %d, served.bin at %d\n' \
    "$pattern" "$notes" "$zeroed" "$discarded" "$served"
run qemu-img convert -c -f raw -O qcow2 rootfs.raw golden.qcow2
rm rootfs.raw
run ls -ls golden.qcow2
run qemu-img info golden.qcow2

say "2. An add-cow image over it (the seed's command line): raw image file + .add-cow"
# The format of a backing file is never guessed: without -F this is refused, on purpose.
echo "The next command is expected to be refused: it names golden.qcow2 without -F qcow2,"
echo "and addcow never guesses a backing file's format."
if run addcow create -b golden.qcow2 disk.add-cow; then
    echo "demo: addcow create without -F was not refused" >&2
    exit 1
fi
echo "Refused, as expected. Now with the format given (backing_fmt=qcow2):"
run addcow create -f add-cow -o backing_file=golden.qcow2,backing_fmt=qcow2,image_file=disk.raw disk.add-cow
run addcow info --backing-chain disk.add-cow

say "3. Write through it (qemu-io style commands), read back with pattern checks"
script=(-c "write -P 0xab $pattern 64k" -c "write -P 0xcd $((notes + 3000)) 5000"
        -c "write -z $zeroed 128k" -c "discard $discarded 64k" -c "flush"
        -c "read -P 0xab $pattern 64k" -c "read -P 0xcd $((notes + 3000)) 5000")
run addcow io "${script[@]}" disk.add-cow

say "4. Where each range lives: depth 0 = disk.raw, depth 1 = golden.qcow2 (compressed clusters have no offset)"
run addcow map disk.add-cow
run addcow map --output=json --start-offset="$pattern" --max-length=256k disk.add-cow

say "5. Consistency check (every L2 table of golden.qcow2 too)"
run addcow check disk.add-cow

say "6. The whole virtual disk as a standalone raw file"
run addcow convert -p disk.add-cow full.raw
run addcow compare disk.add-cow full.raw

say "7. Referee: QEMU does the same job on a qcow2 overlay over the same golden image"
run qemu-img create -q -f qcow2 -b golden.qcow2 -F qcow2 -o cluster_size=64k overlay.qcow2
run qemu-io -f qcow2 "${script[@]}" overlay.qcow2 > /dev/null
run qemu-img compare full.raw overlay.qcow2

say "8. Serve it over NBD, as QEMU boots from it (the server detaches once it listens, logging to $out/serve-detached.log)"
sockdir=$(mktemp -d)
trap 'test -s serve.pid && kill "$(cat serve.pid)" 2>/dev/null; rm -rf "$sockdir"' EXIT
uri="nbd+unix:///?socket=$sockdir/nbd.sock"
run addcow serve --socket "$sockdir/nbd.sock" --pidfile "$PWD/serve.pid" \
    --log-file "$PWD/serve-detached.log" disk.add-cow
run qemu-img info "$uri"
run nbdinfo --map=qemu:allocation-depth "$uri"
run qemu-io -f raw -c "write -P 0xef $served 64k" "$uri"
run qemu-io -f qcow2 -c "write -P 0xef $served 64k" overlay.qcow2 > /dev/null
run qemu-img compare "$uri" overlay.qcow2

say "9. Stream while it is served; the server detaches it and goes on serving disk.raw alone"
run kill "$(cat serve.pid)"
for _ in $(seq 600); do test -e serve.pid || break; sleep 0.05; done
run cat serve-detached.log  # what the detached server logged, up to its exit
printf '$ addcow serve --foreground --socket %q --pidfile %q --stream --detach-when-complete disk.add-cow > serve.out 2> serve.log &\n' \
    "$sockdir/nbd.sock" "$PWD/serve.pid"
addcow serve --foreground --socket "$sockdir/nbd.sock" --pidfile "$PWD/serve.pid" \
    --stream --detach-when-complete disk.add-cow > serve.out 2> serve.log &
for _ in $(seq 600); do test -s serve.out && ! test -e disk.add-cow && break; sleep 0.05; done
run cat serve.log
run ls disk.add-cow disk.raw 2>&1 || true
run qemu-img compare "$uri" overlay.qcow2
run kill "$(cat serve.pid)"
wait

say "10. disk.raw stands alone: QEMU's overlay's disk, a clean file system, the files as written"
run qemu-img compare -f raw disk.raw overlay.qcow2
run qemu-img info -f raw disk.raw
run ls -ls disk.raw
run e2fsck -fn disk.raw
run debugfs -R "dump /data/served.bin served.bin" disk.raw
run od -An -tx1 -N16 served.bin
run debugfs -R "cat /etc/hostname" disk.raw

say "Done: the add-cow image and QEMU's overlay hold the same disk; disk.raw now stands alone."
