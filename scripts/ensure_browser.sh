#!/bin/sh
# The dashboard test drives Debian's Chromium (tests/service/test_dashboard.py): install it when it
# is missing and this machine can (root and apt-get); otherwise say that the test will be skipped.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard test"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1
  }
fi
command -v chromium >/dev/null 2>&1 || echo "note: no Chromium here: the dashboard's browser test will be skipped"
exit 0
