#!/usr/bin/env bash
# `make run`: an all-in-one cluster on this machine with one real VM, `primary`, then a tour.
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${DATA_DIR:-$HOME/.local/share/multiverse}
mv=.venv/bin/multiverse
export MULTIVERSE_CONFIG="$data_dir/client.toml"

"$mv" up --detach --data-dir "$data_dir"
if ! "$mv" info primary >/dev/null 2>&1; then
  "$mv" launch --name primary --memory 512M --disk 2G
fi
echo
echo "\$ multiverse nodes";     "$mv" nodes
echo
echo "\$ multiverse instances"; "$mv" instances
echo
echo "\$ multiverse info";      "$mv" info
cat <<TXT

Multiverse is up (data in $data_dir). Next, with the CLI at $PWD/$mv:
  multiverse shell                       # a shell in primary
  multiverse exec primary -- uname -a
  multiverse launch --name web-1 --memory 512M
  multiverse stop primary / start primary / delete web-1
  multiverse node drain <node> / node restore <node>
  make stop                              # stop the cluster (VMs keep running)
This cluster listens on 127.0.0.1 only. For many hosts run \`multiverse master\`, then on each
host: MULTIVERSE_JOIN_TOKEN=\$(multiverse token create) multiverse worker --master <master>:1337
The CLI finds this cluster through $HOME/.config/multiverse/config.toml (or MULTIVERSE_CONFIG).
TXT
