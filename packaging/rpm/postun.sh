# %postun of rpcd, as %systemd_postun_with_restart rpcd.service: on upgrade
# (not on removal), restart the service if it is running. With systemd's
# update helper the restart is marked and done by systemd's file triggers
# after the transaction; without it, reload the units and restart here.
if [ "$1" -ge 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper mark-restart-system-units rpcd.service || :
    elif [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        systemctl try-restart rpcd.service >/dev/null 2>&1 || :
    fi
elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
