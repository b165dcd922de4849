# %pre of rpcd: create the rpcd system user and group before the files land,
# like %sysusers_create_package with packaging/rpcd.sysusers (the line below
# is that file's; tests/packaging.rs keeps them equal).
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers --replace=/usr/lib/sysusers.d/rpcd.conf - <<'SYSUSERS' || :
u     rpcd -  "rpcd RPC daemon"    /nonexistent
SYSUSERS
else
    getent group rpcd >/dev/null || groupadd -r rpcd
    getent passwd rpcd >/dev/null ||
        useradd -r -g rpcd -d /nonexistent -s /sbin/nologin -c "rpcd RPC daemon" rpcd
fi
exit 0
