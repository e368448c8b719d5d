#!/usr/bin/env bash
# The main job end to end on generated sample images (run by `make demo`):
# a base disk, an add-cow image over it, writes through it, then map, check,
# convert, compare, with QEMU doing the same job on a qcow2 overlay as referee;
# then the image served over NBD, streamed while served and detached by the
# server, leaving a standalone raw disk.
set -euo pipefail
out=demo-out
rm -rf "$out" && mkdir -p "$out" && cd "$out"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Echo a command quoted as the shell needs it, so it can be pasted, then run it.
run() { printf '$'; printf ' %q' "$@"; printf '\n'; "$@"; }

say "1. A 64 MiB base disk: 8 MiB of random data, the rest sparse"
head -c 8M /dev/urandom > base.raw
truncate -s 64M base.raw
run ls -ls base.raw

say "2. An add-cow image over it (the seed's command line): raw image file + .add-cow"
run addcow create -f add-cow -o backing_file=base.raw,backing_fmt=raw,image_file=disk.raw disk.add-cow
run addcow info disk.add-cow

say "3. Write through it (qemu-io style commands), read back with pattern checks"
script=(-c "write -P 0xab 1M 64k" -c "write -P 0xcd 3000 5000" -c "write -z 16M 128k"
        -c "discard 20M 64k" -c "flush" -c "read -P 0xab 1M 64k" -c "read -P 0xcd 3000 5000")
run addcow io "${script[@]}" disk.add-cow

say "4. Where each range lives: depth 0 = disk.raw, depth 1 = base.raw"
run addcow map disk.add-cow
run addcow map --output=json --max-length=4M disk.add-cow

say "5. Consistency check"
run addcow check disk.add-cow

say "6. The whole virtual disk as a standalone raw file"
run addcow convert -p disk.add-cow full.raw
run addcow compare disk.add-cow full.raw

say "7. Referee: QEMU does the same job on a qcow2 overlay"
run qemu-img create -q -f qcow2 -b base.raw -F raw -o cluster_size=64k overlay.qcow2
run qemu-io -f qcow2 "${script[@]}" overlay.qcow2 > /dev/null
run qemu-img compare full.raw overlay.qcow2

say "8. Serve it over NBD, as QEMU boots from it (the server detaches once it listens)"
sockdir=$(mktemp -d)
trap 'test -s serve.pid && kill "$(cat serve.pid)" 2>/dev/null; rm -rf "$sockdir"' EXIT
uri="nbd+unix:///?socket=$sockdir/nbd.sock"
run addcow serve --socket "$sockdir/nbd.sock" --pidfile "$PWD/serve.pid" disk.add-cow
run qemu-img info "$uri"
run nbdinfo --map=qemu:allocation-depth "$uri"
run qemu-io -f raw -c "write -P 0xef 40M 64k" "$uri"
run qemu-io -f qcow2 -c "write -P 0xef 40M 64k" overlay.qcow2 > /dev/null
run qemu-img compare "$uri" overlay.qcow2

say "9. Stream while it is served; the server detaches it and goes on serving disk.raw alone"
run kill "$(cat serve.pid)"
for _ in $(seq 600); do test -e serve.pid || break; sleep 0.05; done
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
run qemu-img compare -f raw disk.raw overlay.qcow2
run qemu-img info -f raw disk.raw

say "Done: the add-cow image and QEMU's overlay hold the same disk; disk.raw now stands alone."
