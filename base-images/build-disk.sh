#!/usr/bin/env bash
# Build a bootable AMI-style raw disk (GPT, BIOS boot + ext4 root, GRUB i386-pc)
# of a Debian suite plus the given packages. Called by `bakery base build`,
# which parses the base-image TOML and passes its values as flags.
#
#   build-disk.sh --suite bookworm --packages "pkg1,pkg2" --disk-size-mib 4096 \
#                 --hostname NAME --out /path/disk.raw --work /path/workdir
#
# Optional: --apt-sources FILE  (deb822 .sources or one-line .list file to use
# instead of scanning the host's /etc/apt/sources.list{,.d/}).
#
# Needs root and: mmdebstrap, e2fsprogs (>= 1.43 for mke2fs -d), gdisk
# (sgdisk), util-linux (losetup, partx, mount), coreutils. GRUB itself runs
# from inside the image (grub-pc must be among the packages).
set -euo pipefail

readonly PROG=build-disk
# Disk layout (fixed so that callers and tests can rely on it).
readonly SECTOR=512
readonly BIOS_START=2048       # 1 MiB
readonly BIOS_END=4095         # 1 MiB long
readonly ROOT_START=4096       # 2 MiB
readonly BIOS_BOOT_TYPE=21686148-6449-6E6F-744E-656564454649
readonly ROOT_X86_64_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
readonly FS_LABEL=root
readonly CONSOLE_ARGS="console=tty0 console=ttyS0,115200"
readonly FSTAB_LINE="LABEL=$FS_LABEL / ext4 defaults,noatime,errors=remount-ro 0 1"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

suite='' packages='' disk_mib='' hostname='' out='' work='' apt_sources=''
while [[ $# -gt 0 ]]; do
    case "$1" in
        --suite) suite=${2-}; shift 2 ;;
        --packages) packages=${2-}; shift 2 ;;
        --disk-size-mib) disk_mib=${2-}; shift 2 ;;
        --hostname) hostname=${2-}; shift 2 ;;
        --out) out=${2-}; shift 2 ;;
        --work) work=${2-}; shift 2 ;;
        --apt-sources) apt_sources=${2-}; shift 2 ;;
        -h|--help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done

[[ -n $suite && -n $packages && -n $disk_mib && -n $hostname && -n $out && -n $work ]] \
    || { log "missing required flag"; usage; }
[[ $suite =~ ^[a-z][a-z0-9.-]*$ ]] || die "bad --suite: $suite"
if ! [[ $disk_mib =~ ^[0-9]+$ ]] || ((10#$disk_mib < 64)); then
    die "bad --disk-size-mib: $disk_mib (MiB, at least 64)"
fi
# RFC 1123 host name label.
[[ $hostname =~ ^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$ ]] || die "bad --hostname: $hostname"
[[ $packages =~ ^[a-z0-9][a-z0-9+.,:=~\ -]*$ ]] || die "bad --packages: $packages"
[[ -d $work ]] || die "--work $work is not a directory (the caller creates it)"
((EUID == 0)) || die "must run as root (loop devices, mounts, chroot)"
for tool in mmdebstrap sgdisk mke2fs e2fsck losetup partx mount umount chroot setsid awk; do
    command -v "$tool" >/dev/null || die "missing host tool: $tool"
done

work=$(realpath -e "$work")
out_dir=$(realpath -e "$(dirname "$out")") || die "output directory of $out does not exist"
out="$out_dir/$(basename "$out")"
case "$out" in "$work"/*) die "--out must not be inside --work" ;; esac

root="$work/rootfs"   # the image's file tree, built by mmdebstrap
mnt="$work/mnt"       # the root partition mounted for grub-install
tmp_out="$out.partial.$$"  # renamed to $out only on success
loop=''               # set once attached, so cleanup knows what to undo
child=''              # pid of the long-running command, for signal forwarding
mounts=()             # mount points we created, undone in reverse order

# Unmount everything under $work whatever created it (mmdebstrap killed
# mid-run leaves /dev, /proc, /sys binds in the rootfs; the caller's rm -rf
# of --work must never descend into a bound /dev).
unmount_under_work() {
    local m
    awk -v w="$work" '$5 == w || index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do
            umount -R "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
}

cleanup() {
    local rc=$?
    # Ignore further signals: a second one mid-cleanup would leave bind mounts of the host behind.
    trap - EXIT ERR
    trap "" INT TERM HUP
    set +e
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount -R "${mounts[i]}" 2>/dev/null || umount -lR "${mounts[i]}" 2>/dev/null
    done
    mounts=()
    unmount_under_work
    if [[ -n $loop ]]; then
        partx -d "$loop" 2>/dev/null
        losetup -d "$loop" 2>/dev/null || log "warning: could not detach $loop"
        loop=''
    fi
    if [[ -e $tmp_out ]]; then
        rm -f "$tmp_out"
        log "removed the partial disk $tmp_out"
    fi
    ((rc == 0)) || log "FAILED during '$current_step' (exit $rc)"
    exit "$rc"
}
on_signal() { log "caught SIG$1, cleaning up"; exit "$2"; }
current_step='reading apt sources'
trap cleanup EXIT
trap 'log "command failed at line $LINENO: $BASH_COMMAND"' ERR
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# Run a long command in the background and wait, so that a signal to this
# script is handled at once rather than after the command ends. The command
# gets its own process group, which cleanup signals as a whole: mmdebstrap
# alone would wait for the running apt/dpkg to finish before cleaning up.
run() {
    setsid "$@" &
    child=$!
    local rc=0
    wait "$child" || rc=$?
    child=''
    return "$rc"
}

step_start=$SECONDS
step() {
    current_step=$1
    log "$1"
    step_start=$SECONDS
}
step_done() { log "$1 done in $((SECONDS - step_start)) s"; }

# --- Debian mirror from the host's apt sources ------------------------------
# Keep the deb822 stanzas (or one-line entries, converted) whose suites include
# SUITE, SUITE-updates or SUITE-security, with Suites narrowed to those and
# Types to "deb". Stanzas signed by a non-Debian keyring are skipped so that a
# third-party repository that happens to use the suite name is not picked up.
# The mirror host is thus read at run time and never stored in the repository.
extract_sources() {
    awk -v suite="$suite" '
        function trim(s) { gsub(/^[ \t\n]+|[ \t\n]+$/, "", s); return s }
        function norm(s) { s = trim(s); gsub(/[ \t\n]+/, " ", s); return s }
        function wanted_suites(list,   n, a, i, keep) {
            n = split(norm(list), a, " "); keep = ""
            for (i = 1; i <= n; i++)
                if (a[i] == suite || a[i] == suite "-updates" || a[i] == suite "-security")
                    keep = keep (keep == "" ? "" : " ") a[i]
            return keep
        }
        function emit(uris, suites, comps, extra) {
            if (found++) print ""
            print "Types: deb"; print "URIs: " uris; print "Suites: " suites
            print "Components: " comps
            if (extra != "") printf "%s", extra
        }
        function reset() { nk = 0; split("", val); split("", name) }
        function flush(   i, k, s, extra) {
            if (nk == 0) return
            s = wanted_suites(val["suites"])
            if (tolower(norm(val["enabled"])) != "no" && (" " norm(val["types"]) " ") ~ / deb / &&
                s != "" && val["uris"] != "" &&
                (val["signed-by"] == "" || val["signed-by"] ~ /debian-archive/)) {
                extra = ""
                for (i = 1; i <= nk; i++) {
                    k = tolower(name[i])
                    if (k == "types" || k == "uris" || k == "suites" || k == "components" || k == "enabled")
                        continue
                    extra = extra name[i] ": " val[k] "\n"
                }
                emit(norm(val["uris"]), s, norm(val["components"]), extra)
            }
            reset()
        }
        FNR == 1 { flush(); deb822 = (FILENAME ~ /\.sources$/) }
        deb822 && /^#/ { next }
        deb822 && /^[ \t]*$/ { flush(); next }
        deb822 && /^[ \t]/ { if (nk) val[tolower(name[nk])] = val[tolower(name[nk])] "\n" $0; next }
        deb822 {
            i = index($0, ":"); if (i == 0) next
            k = substr($0, 1, i - 1); name[++nk] = k; val[tolower(k)] = trim(substr($0, i + 1))
            next
        }
        # One-line format: deb [opts] URI SUITE COMPONENT...
        {
            sub(/#.*/, "")
            if ($1 != "deb") next
            i = 2; extra = ""
            if ($2 ~ /^\[/) {
                opts = ""
                for (; i <= NF; i++) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } }
                gsub(/[\[\]]/, "", opts)
                n = split(norm(opts), o, " ")
                for (j = 1; j <= n; j++) {
                    split(o[j], kv, "=")
                    if (kv[1] == "signed-by") extra = extra "Signed-By: " kv[2] "\n"
                    else if (kv[1] == "arch") extra = extra "Architectures: " kv[2] "\n"
                }
            }
            uri = $i; s = wanted_suites($(i + 1)); comps = ""
            for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
            if (s == "" || comps == "") next
            if (extra ~ /Signed-By/ && extra !~ /debian-archive/) next
            emit(uri, s, comps, extra)
        }
        END { flush() }
    ' "$@"
}

sources_file="$work/debian.sources"
if [[ -n $apt_sources ]]; then
    [[ -r $apt_sources ]] || die "--apt-sources $apt_sources is not readable"
    src_candidates=("$apt_sources")
else
    shopt -s nullglob
    src_candidates=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
    shopt -u nullglob
fi
readable=()
for f in "${src_candidates[@]}"; do [[ -r $f ]] && readable+=("$f"); done
((${#readable[@]} > 0)) || die "no apt sources files found on the host"
extract_sources "${readable[@]}" >"$sources_file"
grep -Eq "^Suites:(.* )?$suite( |\$)" "$sources_file" ||
    die "no Debian apt source for suite '$suite' in ${readable[*]} (need a stanza whose Suites include $suite)"
log "using Debian sources from the host: $(awk '/^URIs:/ { printf "%s ", $2 }' "$sources_file")"

# --- root file system tree ---------------------------------------------------
step "mmdebstrap $suite (minbase + ${packages//,/ })"
unmount_under_work  # never rm -rf through a leftover bind of /dev
rm -rf --one-file-system "$root"
mkdir -p "$root" "$work/tmp"
# Essential hooks run before the --include packages are installed:
# - man1: minbase has no man dirs and openjdk's postinst (update-alternatives
#   with man page slaves) fails without it.
# - FSTYPE: the kernel's postinst builds the initramfs, whose fsck hook probes
#   the (not yet existing) root device for its type unless told: without it,
#   no fsck.ext4 in the initramfs and no root fsck at boot.
# mmdebstrap installs its own policy-rc.d and start-stop-daemon diversion
# while installing, so no service starts in the chroot.
# shellcheck disable=SC2016 # $1 is expanded by mmdebstrap's hook shell
run env TMPDIR="$work/tmp" mmdebstrap --mode=root --variant=minbase \
    --include="$packages" \
    --essential-hook='mkdir -p "$1/usr/share/man/man1"' \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
    --essential-hook='echo FSTYPE=ext4 >"$1/etc/initramfs-tools/conf.d/bakery-rootfs"' \
    "$suite" "$root" "$sources_file" >&2
step_done "mmdebstrap"

step "configuring the image"
for f in /usr/sbin/grub-install /vmlinuz /initrd.img /lib/systemd/systemd; do
    [[ -e $root$f ]] || die "image lacks $f (are grub-pc, a linux-image and systemd in --packages?)"
done

# Storage and root-fs drivers must be in the initramfs unless built in:
# NVMe (EC2 Nitro), virtio-blk (KVM/QEMU), ext4; and fsck for the root fs.
kver=$(basename "$(readlink -f "$root/vmlinuz")"); kver=${kver#vmlinuz-}
modlist=$(chroot "$root" lsinitramfs "/boot/initrd.img-$kver")
grep -q 'fsck\.ext4$' <<<"$modlist" || die "initramfs for $kver lacks fsck.ext4 (is e2fsprogs installed?)"
for pair in BLK_DEV_NVME:nvme VIRTIO_BLK:virtio_blk EXT4_FS:ext4; do
    opt=${pair%%:*} mod=${pair#*:}
    if grep -q "^CONFIG_$opt=m" "$root/boot/config-$kver"; then
        grep -Eq "/$mod\.ko(\.[a-z]+)?$" <<<"$modlist" ||
            die "initramfs for $kver lacks $mod.ko"
    fi
done

echo "$FSTAB_LINE" >"$root/etc/fstab"
echo "$hostname" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$hostname
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF

# DHCP on every Ethernet NIC whatever its name (ens5 on Nitro, eth0 on Xen).
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/80-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
# mmdebstrap copied the host's resolv.conf in; use resolved's stub instead.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# The registration agent (bakery-agent, next to this script; what it does is said there).
install -d "$root/usr/local/sbin" "$root/etc/bakery"
install -m 0755 "$(dirname "$0")/bakery-agent" "$root/usr/local/sbin/bakery-agent"
cat >"$root/etc/systemd/system/bakery-agent.service" <<'EOF'
[Unit]
Description=Registers this instance in the service registry (bakery-agent)
After=network-online.target

[Service]
ExecStart=/usr/local/sbin/bakery-agent
# It exits 0 on an instance no launcher started: nothing to register.
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF

# --root: offline enablement, needs neither /proc nor a bus in the chroot.
chroot "$root" systemctl --root=/ --quiet enable \
    systemd-networkd.service systemd-resolved.service \
    serial-getty@ttyS0.service tomcat10.service bakery-agent.service

# Empty machine-id: systemd generates a fresh one on each instance's first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# The image's own apt sources: the same host stanzas, nothing mmdebstrap left.
rm -f "$root/etc/apt/sources.list"
find "$root/etc/apt/sources.list.d" -mindepth 1 -delete
install -m 0644 "$sources_file" "$root/etc/apt/sources.list.d/debian.sources"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/tmp/* "$root"/var/tmp/*

# GRUB: find the root fs by UUID (unique, unlike a label another attached
# volume may share); console on both VGA and the serial port (EC2 console log).
fs_uuid=$(cat /proc/sys/kernel/random/uuid)
cat >"$root/etc/default/grub" <<EOF
# Written by bakery build-disk.sh; update-grub on the instance keeps these.
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$CONSOLE_ARGS"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
EOF
# Written here rather than by update-grub: without udev there is no
# /dev/disk/by-uuid, so grub-mkconfig would put root=/dev/loopNp2 on the
# kernel command line. /vmlinuz and /initrd.img are the kernel package's
# symlinks, so this keeps working after a kernel upgrade.
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<EOF
# Written by bakery build-disk.sh; regenerated by update-grub on kernel upgrades.
set default=0
set timeout=1
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $fs_uuid
menuentry 'Debian GNU/Linux' {
	linux /vmlinuz root=UUID=$fs_uuid ro $CONSOLE_ARGS
	initrd /initrd.img
}
EOF
step_done "configuration"

# --- disk --------------------------------------------------------------------
step "creating the ${disk_mib} MiB disk"
rm -f "$tmp_out"
truncate -s "${disk_mib}M" "$tmp_out"
# (sgdisk --quiet silently writes nothing: discard its chatter instead.)
sgdisk \
    -n "1:$BIOS_START:$BIOS_END" -t "1:$BIOS_BOOT_TYPE" -c 1:bios-boot \
    -n "2:$ROOT_START:0" -t "2:$ROOT_X86_64_TYPE" -c "2:$FS_LABEL" \
    "$tmp_out" >/dev/null
root_sectors=$(partx -g -n 2 -o SECTORS "$tmp_out" | tr -d ' ')
[[ $root_sectors =~ ^[0-9]+$ ]] || die "could not read partition 2 of $tmp_out"
root_blocks=$((root_sectors * SECTOR / 4096))

# Fail early with a clear message if the tree cannot fit (ext4 metadata,
# journal and reserved blocks need roughly 15% + 64 MiB on top).
tree_bytes=$(du -sxb "$root" | cut -f1)
need=$((tree_bytes * 115 / 100 + 64 * 1024 * 1024))
((need <= root_blocks * 4096)) ||
    die "--disk-size-mib $disk_mib too small: the tree is $((tree_bytes >> 20)) MiB, need ~$(((need >> 20) + 3)) MiB"

# mke2fs -d writes the tree straight into the partition's byte range of the
# sparse file: no loop mount and copy, and only used blocks are allocated.
# A private mke2fs.conf pins features that GRUB 2.06 (bookworm) reads:
# newer e2fsprogs enable metadata_csum_seed/orphan_file by default.
cat >"$work/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
EOF
run env MKE2FS_CONFIG="$work/mke2fs.conf" mke2fs -q -F -t ext4 -b 4096 -L "$FS_LABEL" -U "$fs_uuid" \
    -E "offset=$((ROOT_START * SECTOR)),root_owner=0:0" -d "$root" "$tmp_out" "$root_blocks" >&2
step_done "disk and file system"

# --- GRUB --------------------------------------------------------------------
step "installing GRUB (i386-pc)"
loop=$(losetup --find --show "$tmp_out")
# The kernel may have no partition-table parsers (then losetup -P makes no
# pN nodes); partx adds the partitions explicitly unless they already exist.
[[ -b ${loop}p2 ]] || partx -a "$loop"
for _ in $(seq 50); do [[ -b ${loop}p2 ]] && break; sleep 0.1; done
[[ -b ${loop}p2 ]] || die "no partition node ${loop}p2 after partx -a"

mkdir -p "$mnt"
mount "${loop}p2" "$mnt"
mounts+=("$mnt")
# grub-install inside the image (its own GRUB version) needs the loop nodes
# and sysfs to map the root partition to its disk.
for d in dev proc sys; do
    mount --bind "/$d" "$mnt/$d"
    mounts+=("$mnt/$d")
done
chroot "$mnt" grub-install --target=i386-pc --modules="part_gpt ext2" "$loop" >&2
[[ -f $mnt/boot/grub/i386-pc/core.img ]] || die "grub-install produced no core.img"

for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}"; done
mounts=()
e2fsck -fn "${loop}p2" >"$work/e2fsck.log" 2>&1 ||
    { cat "$work/e2fsck.log" >&2; die "e2fsck found errors on the root file system"; }
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=''
step_done "GRUB"

mv -f "$tmp_out" "$out"
log "done: $out ($(du -h "$out" | cut -f1) allocated of ${disk_mib} MiB; root fs UUID $fs_uuid)"
