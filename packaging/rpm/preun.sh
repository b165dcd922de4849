# %preun of rpcd, as %systemd_preun rpcd.service: on removal (not on upgrade),
# disable and stop the service.
if [ "$1" -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units rpcd.service || :
    else
        systemctl --no-reload disable --now rpcd.service >/dev/null 2>&1 || :
    fi
fi
exit 0
