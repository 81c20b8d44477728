#!/usr/bin/env bash
# Screenshot a Corral page (a report file or a served URL) with headless Chromium.
#   scripts/screenshot.sh report.html report.png [WIDTHxHEIGHT]
#   scripts/screenshot.sh http://127.0.0.1:8000/ chat.png 1000x800
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 PAGE_OR_URL OUTPUT.png [WIDTHxHEIGHT]" >&2
  exit 2
fi
page=$1 out=$2 size=${3:-1000x2400}
case "$page" in
  http://*|https://*|file://*) url=$page ;;
  *) [ -f "$page" ] || { echo "$0: $page: no such file" >&2; exit 2; }
     url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")" ;;
esac
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "$0: chromium is not installed (apt-get install chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network at start-up; the machine has none to offer.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$out" "$url" >/dev/null 2>&1
[ -s "$out" ] || { echo "$0: no screenshot was written" >&2; exit 1; }
echo "$out"
