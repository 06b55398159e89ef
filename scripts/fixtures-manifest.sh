#!/usr/bin/env bash
# Rewrites tests/fixtures/MANIFEST.txt: sha256, size and path of every tracked fixture file (run after regenerating
# a fixture or golden; `git diff tests/fixtures/MANIFEST.txt` then shows exactly what changed).
set -euo pipefail
cd "$(dirname "$0")/../tests/fixtures"
tmp=$(mktemp)
{
  echo "# sha256  bytes  path  (every tracked fixture file; regenerate with scripts/fixtures-manifest.sh)"
  git ls-files . | grep -v '^MANIFEST.txt$' | LC_ALL=C sort | while read -r f; do
    printf "%s  %10d  %s\n" "$(sha256sum "$f" | cut -d' ' -f1)" "$(stat -c %s "$f")" "$f"
  done
} > "$tmp"
mv "$tmp" MANIFEST.txt
