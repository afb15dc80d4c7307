#!/bin/bash
# storage/ceph_rgw.sh start|stop|status|run — a real Ceph RADOS Gateway (S3) on 127.0.0.1 for the
# full S3 benchmark (not CI: it needs Debian packages and ~15 s to start). Single node: 1 mon +
# 1 OSD (BlueStore on a sparse file, or MemStore) + radosgw (beast). No cephx, no mgr; every
# daemon listens on 127.0.0.1 only. Adapted from the tested recipe in ../shared/s3/ceph_s3.sh.
# Needs (Debian 12, as root): apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
#   --no-install-recommends radosgw ceph-mon ceph-osd ceph-common curl
# `start` returns once radosgw answers and prints the endpoint and the export lines; `run` does
# the same in the foreground (Ctrl-C/SIGTERM stops every daemon); `stop` stops them by PID.
# Env: CEPH_DIR (default /tmp/ceph-s3; its data persists across start/stop), RGW_PORT (5304),
#      MON_PORT (6789), OBJSTORE (bluestore|memstore, default bluestore),
#      S3_KEY/S3_SECRET (dummy testkey/testsecret), BUCKET (optional: created after start).
# Ceph Pacific (16.2) honours If-None-Match on PutObject (async_ckpt's manifest commit) but not on
# CompleteMultipartUpload, which async_ckpt does not rely on. Then, e.g.:
#   eval "$(storage/ceph_rgw.sh start | grep ^export)"; python -m bench.s3   # uses $ASYNC_CKPT_S3_ENDPOINT
set -Eeuo pipefail
D=${CEPH_DIR:-/tmp/ceph-s3}
RGW_PORT=${RGW_PORT:-5304}
MON_PORT=${MON_PORT:-6789}
OBJSTORE=${OBJSTORE:-bluestore}
S3_KEY=${S3_KEY:-testkey}
S3_SECRET=${S3_SECRET:-testsecret}
BUCKET=${BUCKET:-}
C="-c $D/ceph.conf"
ENDPOINT="http://127.0.0.1:$RGW_PORT"

need_tools() {
  local missing=()
  for t in ceph-mon ceph-osd ceph monmaptool radosgw radosgw-admin curl; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "ceph_rgw.sh: missing ${missing[*]}; install (Debian 12, as root): apt-get install -y" \
         "--no-install-recommends radosgw ceph-mon ceph-osd ceph-common curl" >&2
    exit 2
  fi
}

print_env() {  # the endpoint and what to export (the same variables as storage/seaweedfs.sh)
  echo "# Ceph RGW S3 on $ENDPOINT (data in $D; stop: CEPH_DIR=$D $0 stop)"
  echo "export AWS_ENDPOINT_URL=$ENDPOINT"
  echo "export AWS_ACCESS_KEY_ID=$S3_KEY"
  echo "export AWS_SECRET_ACCESS_KEY=$S3_SECRET"
  echo "export AWS_DEFAULT_REGION=us-east-1"
  echo "export ASYNC_CKPT_S3_ENDPOINT=$ENDPOINT"
  [ -z "$BUCKET" ] || echo "# bucket: s3://$BUCKET"
}

make_bucket() {  # PUT /BUCKET signed with SigV4 by curl; an existing bucket of ours is fine
  [ -n "$BUCKET" ] || return 0
  local code
  code=$(curl -sS -o "$D/log/make_bucket.out" -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
         --user "$S3_KEY:$S3_SECRET" -X PUT "$ENDPOINT/$BUCKET")
  case "$code" in
    200) ;;
    409) grep -q BucketAlreadyOwnedByYou "$D/log/make_bucket.out" ||
           { echo "bucket $BUCKET: $(cat "$D/log/make_bucket.out")" >&2; return 1; } ;;
    *) echo "creating bucket $BUCKET failed with HTTP $code: $(cat "$D/log/make_bucket.out")" >&2; return 1 ;;
  esac
}

rgw_up() {  # anonymous ListBuckets answered by radosgw itself
  curl -fsS "$ENDPOINT/" 2>/dev/null | grep -q ListAllMyBucketsResult &&
    kill -0 "$(cat "$D/run/rgw.fgpid")" 2>/dev/null
}
wait_pid_gone() { for _ in $(seq 1 80); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.25; done; return 1; }

init() {
  mkdir -p "$D"/{mon,osd0,run,log,rgw}
  local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
  cat > "$D/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
# with auth=none the OSD can send its boot-time mon commands before it has the monmap
# ("wrong fsid" race), so place it in CRUSH from the script instead
osd crush update on start = false
osd class update on start = false
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
mon data = $D/mon/\$name
osd data = $D/osd\$id
osd objectstore = $OBJSTORE
osd max object name len = 460
osd max object namespace len = 64
osd memory target = 939524096
bluestore block path = $D/osd0/block.file
bluestore block create = true
bluestore block size = 21474836480
bluestore fsck on mount = false
memstore device bytes = 4294967296
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $D/rgw
rgw dns name = localhost
rgw enable usage log = false
rgw enable lc threads = false
# reclaim space of deleted/overwritten objects within ~1 min instead of 2 h
rgw gc obj min wait = 60
rgw gc processor period = 60
CONF
  monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
  ceph-mon --mkfs -i a $C --monmap "$D/monmap"
}

start() {
  local fresh=0
  trap 'echo "ceph_s3.sh: start failed, stopping; logs in $D/log" >&2; stop' ERR
  if [ ! -f "$D/done" ]; then
    [ -e "$D/ceph.conf" ] && rm -rf "$D"   # our own half-initialised cluster from a failed start
    init; fresh=1
  fi
  ceph-mon -i a $C -f >>"$D/log/mon.stdout" 2>&1 & echo $! >"$D/run/mon.fgpid"
  local deadline=$((SECONDS + 60))
  until timeout 10 ceph $C --connect-timeout 5 mon stat >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || break
    sleep 0.25
  done
  timeout 10 ceph $C --connect-timeout 5 mon stat >/dev/null
  if [ $fresh = 1 ]; then
    local u; u=$(cat /proc/sys/kernel/random/uuid)
    local id; id=$(timeout 30 ceph $C osd new "$u")
    timeout 30 ceph $C osd crush add "osd.$id" 1.0 root=default host=localhost >/dev/null 2>&1
    ceph-osd -i "$id" $C --mkfs --osd-uuid "$u" >>"$D/log/osd-mkfs.log" 2>&1
  fi
  ceph-osd -i 0 $C -f >>"$D/log/osd.stdout" 2>&1 & echo $! >"$D/run/osd.fgpid"
  radosgw -n client.rgw.a $C -f >>"$D/log/rgw.stdout" 2>&1 & echo $! >"$D/run/rgw.fgpid"
  deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    kill -0 "$(cat "$D/run/rgw.fgpid")" 2>/dev/null || { echo "radosgw died, see $D/log" >&2; stop; exit 1; }
    rgw_up && break
    sleep 0.25
  done
  rgw_up
  if [ $fresh = 1 ]; then
    timeout 60 radosgw-admin $C user create --uid=test --display-name=test \
      --access-key="$S3_KEY" --secret-key="$S3_SECRET" >/dev/null
    touch "$D/done"
  fi
  make_bucket
  trap - ERR
  echo "# radosgw ready on $ENDPOINT (pids mon=$(cat "$D/run/mon.fgpid") osd=$(cat "$D/run/osd.fgpid") rgw=$(cat "$D/run/rgw.fgpid"))"
  print_env
}

stop() {
  local pids=()
  for d in rgw osd; do   # SIGTERM gateway and OSD together, then the monitor
    f="$D/run/$d.fgpid"; [ -f "$f" ] && { pids+=("$(cat "$f")"); kill "$(cat "$f")" 2>/dev/null || true; }
  done
  for p in "${pids[@]}"; do wait_pid_gone "$p" || kill -9 "$p" 2>/dev/null || true; done
  f="$D/run/mon.fgpid"
  if [ -f "$f" ]; then p=$(cat "$f"); kill "$p" 2>/dev/null || true; wait_pid_gone "$p" || kill -9 "$p" 2>/dev/null || true; fi
  rm -f "$D"/run/*.fgpid
}

case "${1:-}" in
  start) need_tools; start ;;
  run) need_tools; trap 'stop; exit 0' TERM INT; start; wait ;;   # foreground: daemons are children, SIGTERM stops all
  stop) stop ;;
  status) timeout 20 ceph $C -s ;;
  *) echo "usage: $0 start|stop|status|run" >&2; exit 2 ;;
esac
