# %post of rpcd, as %systemd_post rpcd.service: on first installation, enable
# or not according to the system's presets; the service is not started.
if [ "$1" -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units rpcd.service || :
    else
        systemctl --no-reload preset rpcd.service >/dev/null 2>&1 || :
    fi
fi
exit 0
