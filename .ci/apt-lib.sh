# Shared by .ci/prepare-host.sh and tests/vm/build-image.sh (sourced, not run):
# the Debian mirror this machine's apt uses, and Compose v2 from trixie.
# Mirrors are read from this machine's own apt configuration, never hard-coded.

# The first Debian mirror URI this machine's apt uses (deb822 or one-line format).
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
              /etc/apt/sources.list.d/*.sources | head -n1)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
              /etc/apt/sources.list | head -n1)
    fi
    [ -n "$uri" ] || { echo "no Debian mirror found in the apt configuration" >&2; exit 3; }
    printf '%s\n' "${uri%/}"
}

# Prints the path of trixie's docker-compose .deb (Compose v2) under DIR, fetching
# it once. Debian bookworm only packages Compose v1; trixie's is v2 and needs
# nothing newer than bookworm's libc. A private apt state keeps the system's
# sources untouched.
compose_v2_deb() {
    local dir="$1" mirror
    if compgen -G "$dir/docker-compose_*.deb" >/dev/null; then
        ls "$dir"/docker-compose_*.deb | head -n1
        return
    fi
    mirror=$(debian_mirror)
    mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/sources.list.d"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' \
        "$mirror" >"$dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$dir/sources.list"
                -o "Dir::Etc::SourceParts=$dir/sources.list.d"
                -o "Dir::State::Lists=$dir/lists"
                -o "Dir::Cache::Archives=$dir/archives")
    apt-get "${opts[@]}" update -qq >&2
    (cd "$dir" && apt-get "${opts[@]}" download docker-compose -qq >&2)
    ls "$dir"/docker-compose_*.deb | head -n1
}
