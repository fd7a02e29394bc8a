#!/usr/bin/env bash
# Local Slurm cluster on one machine, for tests and CI.
#
#   cluster.sh install        apt packages (slurmctld slurmd slurm-client munge) if missing
#   cluster.sh start          write configs, start munged + slurmctld + N slurmd, wait for idle
#   cluster.sh run CMD...     run CMD inside the cluster (node names resolve, SLURM_CONF set)
#   cluster.sh status         say whether it runs; sinfo when it does
#   cluster.sh stop           stop everything start started (jobs included)
#   cluster.sh clean          stop, then remove the work folder
#
# Everything lives under one work folder, LOCAL_SLURM_DIR (default /tmp/fcp-slurm):
# configs (etc/), logs (log/), pid files and the munge socket (run/), controller
# state (state/), slurmd spool dirs (spool/), fake GPU device nodes (dev/).
# Nothing outside it is written except apt's own files during `install`.
# Needs root (mount namespaces, mknod, daemons running as root).
#
# How node names resolve (the one design choice worth knowing):
#   The 32 emulated nodes node1..node32 are all 127.0.0.1 (NodeAddr=127.0.0.1,
#   NodeHostname=localhost, one `slurmd -N nodeX` each on its own port), so Slurm
#   itself never needs to resolve them. But jobs do (MASTER_ADDR=node1 for
#   torch.distributed), so "node1".."node32" must be in a hosts file. The machine's
#   /etc/hosts is left alone: `start` launches one small holder process
#   (`unshare --mount` + `sleep infinity`, its pid in run/holder.pid) with a private
#   mount namespace in which etc/hosts (the real /etc/hosts plus the node names) is
#   bind-mounted over /etc/hosts and etc/slurm/ over /etc/slurm. Every daemon is
#   started inside that namespace with `nsenter -t <holder> -m`, so slurmstepd and
#   every job task inherit it; `run` enters the same namespace the same way, so
#   `cluster.sh run getent hosts node7` works and sbatch/srun/squeue/scontrol/scancel
#   find this cluster's slurm.conf both through SLURM_CONF and at /etc/slurm.
#   The namespace lives as long as any process in it; the holder is what `run`
#   enters and what `stop` uses to find everything that belongs to the cluster:
#   `stop` signals the daemons from their pid files (checked against the process
#   name and the namespace), then any process left in the namespace (job steps).
#   (Submitting from outside `run` works too with SLURM_CONF=<dir>/etc/slurm.conf,
#   since jobs run in the daemons' namespace; only the submitting side then cannot
#   resolve node names.)
#
# Environment (all optional):
#   LOCAL_SLURM_DIR            work folder                       [/tmp/fcp-slurm]
#   LOCAL_SLURM_NODES          number of nodes                   [32]
#   LOCAL_SLURM_CPUS           CPUs declared per node            [8]
#   LOCAL_SLURM_GPUS           fake GPUs per node                [8]
#   LOCAL_SLURM_CTLD_PORT      slurmctld port                    [16817]
#   LOCAL_SLURM_NODE_PORT0     slurmd of nodeK listens on PORT0+K [17000]
#   LOCAL_SLURM_START_TIMEOUT  seconds to wait for all nodes idle [120]
#   LOCAL_SLURM_KEEP_ON_FAIL   1: leave daemons up if start fails [0]
#   LOCAL_SLURM_CRED_EXPIRE    credential lifetime = requeue delay [30]
set -euo pipefail

D=${LOCAL_SLURM_DIR:-/tmp/fcp-slurm}
NODES=${LOCAL_SLURM_NODES:-32}
CPUS=${LOCAL_SLURM_CPUS:-8}
GPUS=${LOCAL_SLURM_GPUS:-8}
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-16817}
NODE_PORT0=${LOCAL_SLURM_NODE_PORT0:-17000}
START_TIMEOUT=${LOCAL_SLURM_START_TIMEOUT:-120}
KEEP_ON_FAIL=${LOCAL_SLURM_KEEP_ON_FAIL:-0}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-30}
PACKAGES=(slurmctld slurmd slurm-client munge)

ETC=$D/etc
LOG=$D/log
RUN=$D/run
CONF=$ETC/slurm/slurm.conf
MARKER=$D/.fcp-local-slurm
HOLDER_TAG="fcp-local-slurm-ns:$D"

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*"; }

need_root() {
  [[ $(id -u) == 0 ]] || die "must run as root (mount namespace, mknod, daemons)"
}

# --- process bookkeeping ----------------------------------------------------

# pid stored in a pid file, if that process is alive and is the expected program
# (comm starts with $2) inside this cluster's mount namespace; else nothing.
pid_of() {
  local file=$1 comm=$2 pid ns
  [[ -r $file ]] || return 0
  pid=$(tr -dc 0-9 <"$file")
  [[ -n $pid && -d /proc/$pid ]] || return 0
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 0
  ns=$(cat "$RUN/mntns" 2>/dev/null) || return 0
  [[ $(readlink "/proc/$pid/ns/mnt" 2>/dev/null) == "$ns" ]] || return 0
  echo "$pid"
}

holder_pid() {
  local pid
  pid=$(pid_of "$RUN/holder.pid" sleep)
  [[ -n $pid ]] || return 0
  # argv[0] of the holder carries the work folder: it is ours, not any sleep.
  [[ $(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1) == "$HOLDER_TAG" ]] || return 0
  echo "$pid"
}

# pids of all verified daemons from pid files (slurmd, slurmctld, munged).
daemon_pids() {
  local f
  for f in "$RUN"/slurmd-*.pid; do
    [[ -e $f ]] && pid_of "$f" slurmd
  done
  pid_of "$RUN/slurmctld.pid" slurmctld
  pid_of "$RUN/munged.pid" munged
  return 0
}

# every process in this cluster's mount namespace, provided the namespace is
# verifiably ours (the holder or a daemon from our pid files is in it).
ns_pids() {
  local ns p
  [[ -n "$(holder_pid)$(daemon_pids)" ]] || return 0
  ns=$(cat "$RUN/mntns")
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$ns" ]] && echo "${p#/proc/}"
  done
  return 0
}

is_running() { [[ -n $(holder_pid) ]]; }

# run a command in the cluster's namespace with its slurm.conf.
in_ns() {
  local h
  h=$(holder_pid)
  [[ -n $h ]] || die "cluster not running (LOCAL_SLURM_DIR=$D); run: $0 start"
  nsenter -t "$h" -m -- env SLURM_CONF="$CONF" "$@"
}

# start a daemon in the namespace; its early output goes to log/start.log
launch() { in_ns "$@" </dev/null >>"$LOG/start.log" 2>&1; }

port_listening() { # port -> 0 if something listens on it (tcp or tcp6)
  local hex
  hex=$(printf '%04X' "$1")
  awk -v h="$hex" 'FNR > 1 && $4 == "0A" { n = split($2, a, ":"); if (a[n] == h) f = 1 }
                   END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --- install ------------------------------------------------------------------

cmd_install() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    say "packages already installed: ${PACKAGES[*]}"
    return 0
  fi
  need_root
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The packages' scripts would start munged/slurmd/slurmctld with the system
  # config through invoke-rc.d; we want none of them. Where no policy-rc.d
  # exists, put one that denies service starts in place for the install only.
  local policy=/usr/sbin/policy-rc.d rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# temporary, from %s install\nexit 101\n' "$0" >"$policy"
    chmod 755 "$policy"
  else
    policy=
  fi
  { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
  [[ -z $policy ]] || rm -f "$policy"
  ((rc == 0)) || die "apt-get failed (rc=$rc)"
}

# --- start --------------------------------------------------------------------

write_configs() {
  local last=$((NODE_PORT0 + NODES)) gres_line node_gres=""
  mkdir -p "$ETC/slurm" "$ETC/munge" "$LOG" "$RUN" "$D/state" "$D/spool" "$D/dev" "$D/jobs"
  chmod 700 "$ETC/munge"

  # fake GPUs: character devices with /dev/null's numbers (harmless to open)
  local i
  for ((i = 0; i < GPUS; i++)); do
    [[ -c $D/dev/nvidia$i ]] || mknod -m 666 "$D/dev/nvidia$i" c 1 3
  done
  gres_line="NodeName=node[1-$NODES] Name=gpu File=$D/dev/nvidia[0-$((GPUS - 1))]"
  ((GPUS == 1)) && gres_line="NodeName=node[1-$NODES] Name=gpu File=$D/dev/nvidia0"
  ((GPUS == 0)) && gres_line="# no GPUs (LOCAL_SLURM_GPUS=0)"

  ((GPUS > 0)) && node_gres=" Gres=gpu:$GPUS"
  for ((i = 1; i <= NODES; i++)); do mkdir -p "$D/spool/slurmd-node$i"; done

  # hosts file for the namespace: the real one plus the node names
  {
    cat /etc/hosts
    echo "# fcp local slurm cluster ($D)"
    local names=()
    for ((i = 1; i <= NODES; i++)); do names+=("node$i"); done
    echo "127.0.0.1 ${names[*]}"
  } >"$ETC/hosts"

  # munge key (root-owned, 0400: munged runs as root here)
  dd if=/dev/urandom of="$ETC/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$ETC/munge/munge.key"

  # empty plugstack so the system's /etc/slurm/plugstack.conf.d is not read
  : >"$ETC/slurm/plugstack.conf"

  cat >"$CONF" <<EOF
# Generated by scripts/slurm/local_cluster/cluster.sh for a local test cluster.
ClusterName=fcp-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: job credential lifetime, also how long a requeued job waits
# before it may start again (default 120 s)
AuthInfo=socket=$RUN/munge.socket,cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
PlugStackConfig=$ETC/slurm/plugstack.conf
MailProg=/bin/true

StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

SchedulerType=sched/backfill
# schedule pending jobs every few seconds (defaults 60 s / 30 s), so a requeued
# job starts soon after its cred_expire wait
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# emulated nodes: declared CPUs/memory/GPUs win over what slurmd detects
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
# generous timeouts: 32 slurmd + jobs share 2 real cores
MessageTimeout=30
TCPTimeout=10
BatchStartTimeout=60
SlurmdTimeout=300
SlurmctldTimeout=120
UnkillableStepTimeout=120

NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((NODE_PORT0 + 1))-$last] CPUs=$CPUS RealMemory=4096$node_gres State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  cat >"$ETC/slurm/gres.conf" <<EOF
AutoDetect=off
$gres_line
EOF

  # only read by cgroup plugins (none configured); keeps slurmd quiet if it looks
  cat >"$ETC/slurm/cgroup.conf" <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

start_fail() {
  echo "cluster.sh: error: $*" >&2
  local f
  # first slurmd log that has a fatal or error line other than the usual pmix noise
  f=$(grep -lE 'fatal|error: [^M ]' "$LOG"/slurmd-node*.log 2>/dev/null | head -n1) || true
  [[ -n $f ]] || f=$LOG/slurmd-node1.log
  for f in "$LOG/slurmctld.log" "$f" "$LOG/munged.log" "$LOG/start.log"; do
    [[ -s $f ]] || continue
    echo "--- $f (errors, then last lines)" >&2
    grep -iE 'error|fatal' "$f" | grep -viE 'pmix|MPI: Cannot|state file|backup state|MailProg' | tail -n 5 >&2 || true
    tail -n 5 "$f" >&2
  done
  if [[ $KEEP_ON_FAIL == 1 ]]; then
    echo "cluster.sh: daemons left running (LOCAL_SLURM_KEEP_ON_FAIL=1); run: $0 stop" >&2
  else
    cmd_stop >&2 || true
  fi
  exit 1
}

cmd_start() {
  need_root
  local p i
  for p in slurmctld slurmd munged sinfo nsenter unshare; do
    command -v "$p" >/dev/null || die "$p not found; run: $0 install"
  done
  [[ $NODES =~ ^[0-9]+$ && $NODES -ge 1 ]] || die "LOCAL_SLURM_NODES must be a positive integer"
  if is_running; then
    die "already running (LOCAL_SLURM_DIR=$D); run: $0 stop"
  fi
  if [[ -n $(daemon_pids) ]]; then
    say "stale daemons from an earlier start found; stopping them"
    cmd_stop
  fi
  if [[ -e $D && ! -e $MARKER && -n $(ls -A "$D") ]]; then
    die "$D exists, is not empty and was not made by this script; set LOCAL_SLURM_DIR"
  fi
  for p in "$CTLD_PORT" $(seq $((NODE_PORT0 + 1)) $((NODE_PORT0 + NODES))); do
    port_listening "$p" && die "port $p is already in use (another cluster?); set LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_NODE_PORT0"
  done

  # fresh state every start: no leftover jobs or node states from a previous run
  mkdir -p "$D"
  touch "$MARKER"
  rm -rf "${ETC:?}" "${LOG:?}" "${RUN:?}" "${D:?}/state" "${D:?}/spool" "${D:?}/dev"
  write_configs
  local t0=$SECONDS

  # 1. the namespace holder (see the top of this file)
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid unshare --mount --propagation private -- bash -c '
      set -e
      echo $$ >"$1/run/holder.pid"
      mount --bind "$1/etc/hosts" /etc/hosts
      mount --bind "$1/etc/slurm" /etc/slurm 2>/dev/null || true
      exec -a "$2" sleep infinity' holder "$D" "$HOLDER_TAG" \
    </dev/null >"$LOG/holder.log" 2>&1 &
  local h=
  for ((i = 0; i < 100; i++)); do
    if [[ -s $RUN/holder.pid ]]; then
      p=$(tr -dc 0-9 <"$RUN/holder.pid")
      if [[ -n $p && $(tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | head -n1) == "$HOLDER_TAG" ]]; then
        h=$p
        break
      fi
    fi
    sleep 0.1
  done
  [[ -n $h ]] || start_fail "namespace holder did not start: $(cat "$LOG/holder.log" 2>/dev/null)"
  readlink "/proc/$h/ns/mnt" >"$RUN/mntns"
  [[ $(cat "$RUN/mntns") != $(readlink /proc/self/ns/mnt) ]] || start_fail "holder is not in a new mount namespace"

  # 2. munged, 3. slurmctld, 4. one slurmd per node (all daemonize themselves)
  # --force: munged refuses a socket whose parent folders are not all world-executable (pytest's and
  # mktemp's 0700 temporary folders); everything that talks to it here runs as root
  launch munged --force --key-file="$ETC/munge/munge.key" --socket="$RUN/munge.socket" \
    --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$RUN/munged.seed" \
    || start_fail "munged failed to start"
  for ((i = 0; i < 50; i++)); do
    [[ -S $RUN/munge.socket ]] && break
    sleep 0.1
  done
  [[ -S $RUN/munge.socket ]] || start_fail "munge socket did not appear"
  launch slurmctld -f "$CONF" || start_fail "slurmctld failed to start"
  for ((i = 1; i <= NODES; i++)); do
    launch slurmd -f "$CONF" -N "node$i" || start_fail "slurmd for node$i failed to start"
  done
  say "daemons started in $((SECONDS - t0))s; waiting for $NODES nodes to be idle"

  local idle=0 deadline=$((SECONDS + START_TIMEOUT)) states=
  while ((SECONDS < deadline)); do
    states=$(in_ns sinfo -h -N -o '%N %t' 2>&1) || true
    idle=$(awk '$2 == "idle" { n++ } END { print n + 0 }' <<<"$states")
    ((idle >= NODES)) && break
    [[ -n $(pid_of "$RUN/slurmctld.pid" slurmctld) ]] || start_fail "slurmctld died"
    sleep 1
  done
  if ((idle < NODES)); then # one last look
    states=$(in_ns sinfo -h -N -o '%N %t' 2>&1) || true
    idle=$(awk '$2 == "idle" { n++ } END { print n + 0 }' <<<"$states")
  fi
  if ((idle < NODES)); then
    start_fail "only $idle of $NODES nodes idle after ${START_TIMEOUT}s; not idle:
$(awk '$2 != "idle"' <<<"$states" | head -n 10)"
  fi
  say "cluster up in $((SECONDS - t0))s: $NODES nodes x $CPUS CPUs x $GPUS GPUs, partition main (LOCAL_SLURM_DIR=$D)"
}

# --- stop ---------------------------------------------------------------------

# send signal $1 to the given pids; ignore ones already gone
signal() {
  local sig=$1 p
  shift
  for p in "$@"; do kill "-$sig" "$p" 2>/dev/null || true; done
}

# wait up to $1 seconds until none of the remaining pids is alive
wait_gone() {
  local t=$1 p alive i
  shift
  for ((i = 0; i < t * 10; i++)); do
    alive=0
    for p in "$@"; do [[ -d /proc/$p ]] && alive=1 && break; done
    ((alive)) || return 0
    sleep 0.1
  done
  return 1
}

cmd_stop() {
  local ns self pids daemons h p
  if [[ -r $RUN/mntns ]]; then
    ns=$(cat "$RUN/mntns")
    self=$(readlink /proc/self/ns/mnt)
    [[ $ns != "$self" ]] || die "stop must run outside the cluster (not via 'run')"
  fi
  mapfile -t pids < <(ns_pids)
  if ((${#pids[@]} == 0)); then
    say "not running (LOCAL_SLURM_DIR=$D)"
    rm -f "$RUN"/*.pid 2>/dev/null || true
    return 0
  fi
  h=$(holder_pid)

  # 1. cancel jobs, so their steps end the normal way
  if [[ -n $h && -n $(pid_of "$RUN/slurmctld.pid" slurmctld) ]]; then
    local jobs
    jobs=$(timeout 15 nsenter -t "$h" -m -- env SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null | tr '\n' ' ') || true
    if [[ -n ${jobs// /} ]]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086 # word splitting wanted
      timeout 15 nsenter -t "$h" -m -- env SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
      # wait (at most KillWait + a bit) for the job steps (slurmstepd) to end
      local deadline=$((SECONDS + 10)) p steps
      while ((SECONDS < deadline)); do
        steps=0
        for p in $(ns_pids); do
          [[ $(cat "/proc/$p/comm" 2>/dev/null) == slurmstepd ]] && steps=$((steps + 1))
        done
        ((steps == 0)) && break
        sleep 0.5
      done
    fi
  fi

  # 2. slurm daemons (pid files), then munged
  mapfile -t daemons < <(
    for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && pid_of "$f" slurmd; done
    pid_of "$RUN/slurmctld.pid" slurmctld
  )
  if ((${#daemons[@]})); then
    say "stopping ${#daemons[@]} slurm daemons"
    signal TERM "${daemons[@]}"
    wait_gone 15 "${daemons[@]}" || signal KILL "${daemons[@]}"
  fi
  local m
  m=$(pid_of "$RUN/munged.pid" munged)
  if [[ -n $m ]]; then
    signal TERM "$m"
    wait_gone 5 "$m" || signal KILL "$m"
  fi

  # 3. anything else still in the namespace (job steps, `run` commands), holder last
  mapfile -t pids < <(ns_pids)
  [[ -n $h ]] || h=0
  local rest=()
  for p in "${pids[@]}"; do [[ $p != "$h" ]] && rest+=("$p"); done
  if ((${#rest[@]})); then
    say "stopping ${#rest[@]} leftover processes in the cluster namespace"
    signal TERM "${rest[@]}"
    wait_gone 5 "${rest[@]}" || signal KILL "${rest[@]}"
    wait_gone 5 "${rest[@]}" || true
  fi
  if [[ $h != 0 ]]; then
    signal TERM "$h"
    wait_gone 5 "$h" || signal KILL "$h"
  fi
  # the namespace is gone once its last process is; check nothing is left
  local left=0
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$ns" ]] && left=$((left + 1))
  done
  rm -f "$RUN"/*.pid
  ((left == 0)) || die "$left processes still in the cluster namespace $ns"
  say "stopped (logs kept in $LOG)"
}

# --- run / status / clean -----------------------------------------------------

cmd_run() {
  need_root
  local h
  h=$(holder_pid)
  [[ -n $h ]] || die "cluster not running (LOCAL_SLURM_DIR=$D); run: $0 start"
  (($#)) || set -- bash
  export SLURM_CONF=$CONF
  exec nsenter -t "$h" -m --wd="$PWD" -- "$@"
}

cmd_status() {
  if is_running; then
    say "running (LOCAL_SLURM_DIR=$D, holder pid $(holder_pid), $(daemon_pids | wc -l) daemons)"
    in_ns sinfo
  else
    say "not running (LOCAL_SLURM_DIR=$D)"
    return 3
  fi
}

cmd_clean() {
  cmd_stop
  if [[ -e $MARKER ]]; then
    rm -rf "$D"
    say "removed $D"
  elif [[ -e $D ]]; then
    die "$D was not made by this script; not removing it"
  fi
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  run) shift; cmd_run "$@" ;;
  status) cmd_status ;;
  clean) cmd_clean ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help || ${1:-} == help ]] && exit 0
    exit 2
    ;;
esac
