"""A real, tiny Slurm cluster on loopback for tests: `cluster = slurm_or_skip(tmp_path_factory)` in a fixture (or
`with SlurmCluster().start(tmpdir) as cluster:`), then run Slurm commands with `env=cluster.environ()`.

What it starts, as root (Debian's slurm-wlm + munge, Slurm 22.05; apt-get installs them when missing):
  munged      -F --force, with its own key, socket, pid and seed files in the temp dir (never the system's)
  slurmctld   -D -f <tmp>/slurm.conf on a free port, state, pid and log in the temp dir
  slurmd      -D -f <tmp>/slurm.conf -N <node> on a free port: one node named `hostname -s` at 127.0.0.1 with
              `cpus` CPUs (or `nodes` such nodes, <host>0, <host>1, ..., each its own slurmd and port)
each under a small supervisor (REAPER) that is this process's child, so `stop()` signals exactly the PIDs it
started, and nothing else. Clients find the cluster through SLURM_CONF (`cluster.env`); slurm.conf's
AuthInfo=socket=... points the daemons and the clients at this munged (libmunge reads no environment variable).
There is no accounting, so no sacct: `job_info`/`job_state` read `scontrol show job -o`, and a finished job
stays listed for MinJobAge (an hour).

Real network hosts: `SlurmCluster(nodes=2, netns=True)` runs each node's slurmd in a network namespace of its own
(`ip netns add`, as scripts/two_hosts.sh does), so node i is a host of its own at `cluster.node_addrs[i]`
(10.232.<k>.<i+1>, k picked free per cluster) on an interface named `cluster.ifname` ("slurm0") in every node:
one GLOO_SOCKET_IFNAME=slurm0 serves all nodes (without it gloo advertises 127.0.0.1 and the other host cannot
connect). The nodes' links meet on a bridge in a hub namespace, and this (root) namespace joins that bridge too,
at 10.232.<k>.254 (`cluster.ctld_addr`, on interface `cluster.host_ifname`): munged and slurmctld run here, the
head node, and every client (sbatch, srun, scontrol, ... with `env=cluster.environ()`, `cluster.run`) works from
this namespace unchanged, as from a login node. A job gets SLURM_CONF from the submitter's environment, so
`scontrol show node NAME -o` (NodeAddr=...) works inside it; node names resolve to no address. Killing every
process of `cluster.namespaces[i]` (`ip netns pids`) is a node dying, the controller untouched. Daemons in a
namespace are started with `nsenter --net=/run/netns/NS` (`cluster.on_node(i)`; `ip netns exec` remounts /sys and
slurmd then finds no cgroup filesystem). `stop()` also kills what is left in its namespaces and deletes them;
namespaces that a dead process of this module left behind are deleted at the next netns start.

Tuned for tests of batch jobs: --requeue (JobRequeue=1), --signal=B:SIG@T, --time limits (OverTimeLimit=0;
KillWait=2 s from SIGTERM to SIGKILL), --dependency with --kill-on-invalid-dep, `scontrol requeue`, a main
scheduling loop every second. Slurm's own granularity still applies (measured on 22.05):
  - --time is in whole minutes (--time=0:20 is one minute); limits and --signal warnings are checked by a 30 s
    background loop: a job is killed up to ~30 s after its limit, and --signal=B:USR1@T arrives at the first
    check with at most T + 30 s left (a lead between T and T + 30 s). `scancel -b -s USR1 ID` signals at once.
  - a requeued job (scontrol requeue, or --requeue after a node failure) gets BeginTime = its end + cred_expire
    (AuthInfo=cred_expire: 120 s by default, 5 s here, the least Slurm accepts); `start_now(job_id)` lifts
    that, and the job runs again within ~1 s.
"""
import atexit
import itertools
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")  # what the slurm-wlm metapackage depends on
CRED_EXPIRE = 5  # seconds a requeued job waits before it may start again (Slurm rejects less, using 120)
NETNS_TOOLS = ("ip", "nsenter")
NETNS_IFNAME = "slurm0"  # each node's interface, the same name in every node namespace
NETNS_SUBNET = "10.232"  # 10.232.<k>.0/24 per cluster (scripts/two_hosts.sh uses 10.231.<k>.0/24)
NETNS_PREFIX = "slurmns"  # namespaces: slurmns<pid>-<seq>-<node index|hub>
_netns_seq = itertools.count()

# Each daemon runs under this supervisor: `python -c REAPER PARENT_PID ARGV...`. It
#  - dies with its parent (PR_SET_PDEATHSIG): a test process killed outright leaves no daemon behind;
#  - forwards SIGTERM/SIGINT/SIGHUP to the daemon and exits with its status as soon as the daemon has exited;
#  - is a child subreaper and reaps what the daemon orphans: slurmd's job steps (slurmstepd) double-fork away
#    from slurmd, and where PID 1 does not reap orphans (this VM's init does not) each would stay a zombie.
REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda n, f: os.kill(pid, n))
while True:
    p, st = os.waitpid(-1, 0)
    if p == pid:
        break
while True:
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            break
    except ChildProcessError:
        break
code = os.waitstatus_to_exitcode(st)
sys.exit(code if code >= 0 else 128 - code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]


def ensure_installed(timeout: float = 300) -> str | None:
    """Install Slurm and munge with apt-get when a binary is missing: None when all are there, else why not."""
    if not _missing():
        return None
    what = f"Slurm is not installed ({', '.join(_missing())} missing)"
    if os.geteuid() != 0:
        return f"{what} and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"{what} and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    deadline = time.monotonic() + timeout
    last = "(no output)"
    for argv in (install, ["apt-get", "update", "-q"], install):  # update only when the first try fails
        try:
            r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"{what} and `{shlex.join(argv)}` took over {timeout:.0f} s"
        last = (r.stdout.strip().splitlines() or [last])[-1]
        if argv is install and r.returncode == 0 and not _missing():
            return None
    return f"{what} and `{shlex.join(install)}` failed: {last}"


def parse_show(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` record as a dict (a value may hold spaces: a key starts after a space)."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.]*)=", line))
    return {m.group(1): line[m.end():keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
            for i, m in enumerate(keys)}


class SlurmError(RuntimeError):
    pass


class NetnsUnavailable(SlurmError):
    """Network namespaces (or the veth pairs and the bridge between them) cannot be made here."""


FINAL = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, in a temp dir: `start(tmpdir)` returns self; `stop()` (also on
    leaving a `with` block, and at exit) cancels the cluster's jobs and stops the daemons; calling it twice is
    fine. `pids`: the supervisor PIDs by daemon ("munged", "slurmctld", "slurmd:<node>").

    netns=True: each node's slurmd in a network namespace of its own (see the module's docstring). Then
    `namespaces` (per node), `node_addrs` (per node), `ifname` (the nodes' interface, "slurm0"), `ctld_addr` and
    `host_ifname` (this namespace's address and interface on the nodes' link), `on_node(i)` (the argv prefix that
    runs a command as on node i). Without netns: node_addrs all 127.0.0.1, ifname "lo", on_node(i) []."""

    def __init__(self, cpus: int = 2, nodes: int = 1, kill_wait: int = 2, cred_expire: int = CRED_EXPIRE,
                 start_timeout: float = 30, extra_conf: str = "", netns: bool = False):
        self.cpus, self.kill_wait, self.cred_expire = cpus, kill_wait, cred_expire
        # job ids of their own: two clusters at once (the test workers) would otherwise both number from 1, and
        # what derives from a job id (dpo_ds's rendezvous port) would meet on this one machine
        self.first_job_id = random.randrange(100, 90000)
        self.start_timeout, self.extra_conf = start_timeout, extra_conf
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else [f"{self.host}{i}" for i in range(nodes)]
        self.netns = netns
        if netns and not 1 <= nodes <= 250:
            raise ValueError("netns=True takes 1 to 250 nodes (one /24)")
        self.ifname = NETNS_IFNAME if netns else "lo"
        self.ctld_addr = "127.0.0.1"
        self.node_addrs = ["127.0.0.1"] * len(self.nodes)
        self.host_ifname = None
        seq = next(_netns_seq)
        self.namespaces = [f"{NETNS_PREFIX}{os.getpid()}-{seq}-{i}" for i in range(nodes)] if netns else []
        self._hub = f"{NETNS_PREFIX}{os.getpid()}-{seq}-hub" if netns else None
        self._netns_made: list[str] = []  # what stop() deletes
        self.procs: dict[str, subprocess.Popen] = {}
        self.dir = self.conf = self.munge_socket = None
        self.env: dict[str, str] = {}
        self._socket_dir = None  # a short directory for munge's socket when the temp dir's path is too long
        self._deadline = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, tmpdir) -> "SlurmCluster":
        if self.procs:
            raise SlurmError("already started")
        self.dir = d = os.path.abspath(os.fspath(tmpdir))
        for sub in ["state", "munge", "log"] + [f"spool/{n}" for n in self.nodes]:
            os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
        # munged wants every directory above its socket searchable by all: --force makes that a warning (the
        # clients are root), so a private (pytest) temp dir does
        self.munge_socket = os.path.join(d, "munge", "munge.socket")
        if len(self.munge_socket) > 100:  # sun_path holds 108 bytes
            self._socket_dir = tempfile.mkdtemp(prefix="slurm-munge-")
            self.munge_socket = os.path.join(self._socket_dir, "munge.socket")
        key = os.path.join(d, "munge", "munge.key")
        if not os.path.exists(key):
            with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
                f.write(os.urandom(1024))
        atexit.register(self.stop)
        if self.netns:
            try:
                self._netns_up()
            except BaseException:
                self.stop()
                raise
        ports = set()
        while len(ports) < 1 + len(self.nodes):
            ports.add(_free_port())
        self.ctld_port, *self.slurmd_ports = sorted(ports)
        self.conf = os.path.join(d, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(self._slurm_conf())
        with open(os.path.join(d, "cgroup.conf"), "w") as f:  # slurmd initialises a cgroup plugin regardless
            f.write("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self.env = {"SLURM_CONF": self.conf}
        self._deadline = time.monotonic() + self.start_timeout
        try:
            self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                                   f"--pid-file={d}/munge/munged.pid", f"--log-file={self.log('munged')}",
                                   f"--seed-file={d}/munge/munged.seed", "--num-threads=2"])
            self._wait(lambda: os.path.exists(self.munge_socket), "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
            self._wait(lambda: "UP" in self.run(["scontrol", "ping"], check=False, timeout=10).stdout,
                       "slurmctld answering `scontrol ping`")
            for i, node in enumerate(self.nodes):
                self._spawn(f"slurmd:{node}", [*self.on_node(i), "slurmd", "-D", "-f", self.conf, "-N", node])
            self._wait(self._nodes_idle, f"node(s) {','.join(self.nodes)} idle in sinfo")
            n = min(max(2, len(self.nodes)), self.cpus * len(self.nodes))
            r = self.run(["srun", "-N", str(len(self.nodes)), "-n", str(n), "-t", "1", "hostname"], check=False,
                         timeout=max(5.0, self._deadline - time.monotonic()))
            if r.returncode != 0 or r.stdout.split() != [self.host] * n:
                raise SlurmError(f"`srun -n {n} hostname` gave {r.returncode}: {(r.stdout + r.stderr)[-500:]!r}; "
                                 f"read {self.log('slurmd')} and {self.log('slurmctld')}")
            while not self._nodes_idle() and time.monotonic() < self._deadline:  # that job is COMPLETING:
                time.sleep(0.1)  # a job submitted now would wait ~2 s for the scheduler
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """scancel every job, wait for them to end, then SIGTERM the daemons, the slurmds first, then slurmctld,
        then munged (each SIGKILLed after 10 s); with netns, kill what is left in the cluster's namespaces and delete
        them; idempotent."""
        if not self.procs:
            self._netns_down()
            atexit.unregister(self.stop)
            return
        procs = self.procs
        try:
            if all(procs.get(k) and procs[k].poll() is None for k in ("munged", "slurmctld")):
                jobs = self._jobs()
                if jobs:
                    self.run(["scancel", *jobs], check=False, timeout=10)
                    t0 = time.monotonic()
                    swept = not self._netns_made
                    while self._jobs() and time.monotonic() < t0 + self.kill_wait + 15:
                        if not swept and time.monotonic() > t0 + self.kill_wait + 3:
                            # a process that outlived its step (`setsid CMD &`) and holds its output keeps the job
                            # COMPLETING: kill it, the daemons still up to report the step's end
                            self._netns_sweep(procs)
                            swept = True
                        time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass
        if self._netns_made:
            self._netns_sweep(procs)
        self.procs = {}
        stages = [[k for k in procs if k.startswith("slurmd:")], ["slurmctld"], ["munged"]]  # slurmd talks to
        for names in stages:  # slurmctld as it stops, both through munged
            for name in names:
                if name in procs and procs[name].poll() is None:
                    procs[name].terminate()
            for name in names:
                p = procs.get(name)
                if p is None:
                    continue
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:  # the daemon first: its supervisor reaps it
                    for pid in _children(p.pid):
                        try:
                            os.kill(pid, 9)
                        except OSError:
                            pass
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                p.stdout_file.close()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self._netns_down()
        atexit.unregister(self.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def on_node(self, i: int) -> list[str]:
        """The argv prefix that runs a command in node i's network namespace (as on that host); [] without netns."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[i]}"] if self.netns else []

    def log(self, daemon: str, node: str | None = None) -> str:
        """The daemon's log file (slurmd: the first node's unless `node`); its stdout/stderr: the same, .out."""
        name = f"slurmd-{node or self.nodes[0]}" if daemon == "slurmd" else daemon
        return os.path.join(self.dir, "log", f"{name}.log")

    # -- clients ---------------------------------------------------------------------------------------------

    def environ(self, base=None) -> dict[str, str]:
        """An environment for a Slurm client: `base` (os.environ) less its SLURM_* variables (a test run inside a
        Slurm job must not talk to that job's cluster) plus `env`."""
        base = os.environ if base is None else base
        return {**{k: v for k, v in base.items() if not k.startswith("SLURM_")}, **self.env}

    def run(self, args, check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster, output captured as text."""
        r = subprocess.run(args, env=kw.pop("env", None) or self.environ(), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmError(f"`{shlex.join(map(str, args))}` exited {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, *args, script: str | None = None, **kw) -> str:
        """Submit a batch job, the script's text as `script` (read from stdin: #SBATCH lines apply) or a path or
        --wrap among `args`; returns the job id."""
        return self.run(["sbatch", "--parsable", *args], input=script, **kw).stdout.strip().split(";")[0]

    def job_info(self, job_id) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, Reason, ExitCode, Restarts, StartTime, EndTime,
        Dependency, ...); {} for a job Slurm does not (or no longer) know."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith(f"JobId={job_id} ")), "")
        return parse_show(line) if r.returncode == 0 and line else {}

    def job_state(self, job_id) -> str | None:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, TIMEOUT, CANCELLED, ...; None for an unknown job."""
        return self.job_info(job_id).get("JobState")

    def wait_job(self, job_id, states=FINAL, timeout: float = 120, poll: float = 0.25) -> dict[str, str]:
        """Wait until the job's state is one of `states` (by default: any final state); its job_info then."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} not {'/'.join(states)} after {timeout} s: "
                                 f"{info.get('JobState')} ({info.get('Reason')})")
            time.sleep(poll)

    def start_now(self, job_id) -> None:
        """Let a pending job start at once: a requeued job otherwise waits cred_expire seconds (BeginTime)."""
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    # -- internals -------------------------------------------------------------------------------------------

    def _slurm_conf(self) -> str:
        d = self.dir
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr={a} Port={p} CPUs={self.cpus} "
                          f"State=UNKNOWN" for n, a, p in zip(self.nodes, self.node_addrs, self.slurmd_ports))
        return f"""# written by tests/slurm_cluster.py
ClusterName=dpotest
FirstJobId={self.first_job_id}
SlurmctldHost={self.host}({self.ctld_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1,batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait}
OverTimeLimit=0
MinJobAge=3600
BatchStartTimeout=10
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=300
SlurmctldTimeout=120
{self.extra_conf}
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log(name.split(":")[0], name.partition(":")[2] or None)[:-4] + ".out", "ab")
        p = subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), *argv], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=out, env=self.environ(), cwd=self.dir, start_new_session=True)
        p.stdout_file = out
        self.procs[name] = p

    def _wait(self, ready, what: str) -> None:
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited {p.returncode} at start: {self._read(name)}")
            try:
                if ready():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            if time.monotonic() > self._deadline:
                name = list(self.procs)[-1]
                raise SlurmError(f"no {what} after {self.start_timeout:.0f} s: {self._read(name)}")
            time.sleep(0.2)

    def _read(self, name: str) -> str:
        """'read LOG and OUT; last lines: ...' for a daemon's error message."""
        log = self.log(name.split(":")[0], name.partition(":")[2] or None)
        lines = []
        for path in (log, log[:-4] + ".out"):
            try:
                with open(path, errors="replace") as f:
                    lines += [ln.strip() for ln in f.readlines()[-3:]]
            except OSError:
                pass
        return f"read {log} and {log[:-4]}.out" + ("; last lines: " + " | ".join(lines) if lines else "")

    def _nodes_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        return r.returncode == 0 and sorted(r.stdout.split()) == sorted(self.nodes + ["idle"] * len(self.nodes))

    def _jobs(self) -> list[str]:
        """Ids of the jobs squeue lists (pending, running, completing)."""
        r = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
        return r.stdout.split() if r.returncode == 0 else []

    # -- network namespaces (netns=True) ---------------------------------------------------------------------

    def _netns_up(self) -> None:
        """The hub namespace with a bridge; per node a namespace and a veth pair, `slurm0` in the node, its peer
        on the bridge; and this namespace's end on the bridge, `slurmh<k>`, which also claims the subnet k (an
        interface name exists once). Raises NetnsUnavailable."""
        missing = [t for t in NETNS_TOOLS if shutil.which(t) is None]
        if missing:
            raise NetnsUnavailable(f"network namespaces need {' and '.join(missing)}, not found")
        _netns_collect()
        for ns in [self._hub, *self.namespaces]:
            _ip("netns", "add", ns)
            self._netns_made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self._hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            _ip("link", "add", "name", self.ifname, "netns", ns, "type", "veth", "peer", "name", f"n{i}",
                "netns", self._hub)
            _ip("-n", self._hub, "link", "set", f"n{i}", "master", "br0", "up")
        used = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True,
                              text=True).stdout + subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                                                 text=True).stdout
        first = os.getpid() % 200 + 20
        for k in [(first + j) % 256 for j in range(256)]:
            if f"{NETNS_SUBNET}.{k}." in used:
                continue
            r = subprocess.run(["ip", "link", "add", "name", f"slurmh{k}", "type", "veth", "peer", "name", "host",
                                "netns", self._hub], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if "exists" not in r.stderr:
                raise NetnsUnavailable(f"`ip link add name slurmh{k} type veth ...` failed: {r.stderr.strip()}")
        else:
            raise NetnsUnavailable(f"no free subnet {NETNS_SUBNET}.<k>.0/24 here")
        self.host_ifname = f"slurmh{k}"
        net = f"{NETNS_SUBNET}.{k}"
        self.ctld_addr = f"{net}.254"
        self.node_addrs = [f"{net}.{i + 1}" for i in range(len(self.nodes))]
        _ip("-n", self._hub, "link", "set", "host", "master", "br0", "up")
        _ip("addr", "add", f"{self.ctld_addr}/24", "dev", self.host_ifname)
        _ip("link", "set", self.host_ifname, "up")
        for ns, addr in zip(self.namespaces, self.node_addrs):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.ifname)
            _ip("-n", ns, "link", "set", self.ifname, "up")

    def _netns_sweep(self, procs) -> None:
        """Kill what jobs left in the namespaces, not the daemons, while their supervisors live to reap it (PID 1
        here does not)."""
        daemons = {c for p in procs.values() for c in _children(p.pid) if _comm(c) in DAEMONS}
        self._netns_kill(keep=daemons, rounds=3)

    def _netns_kill(self, keep=frozenset(), rounds: int = 10) -> None:
        """SIGKILL every process in the cluster's namespaces but `keep`, until none is left (one may fork)."""
        for _ in range(rounds):
            left = [pid for ns in self._netns_made for pid in _netns_pids(ns) if pid not in keep]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.2)

    def _netns_down(self) -> None:
        """Kill what is left in the cluster's namespaces, then delete them (the veth pairs and the bridge go with
        them, this namespace's end too); idempotent."""
        if not self._netns_made:
            return
        self._netns_kill()
        if self.host_ifname:  # at once: a deleted namespace's devices go a moment later (the kernel's cleanup)
            subprocess.run(["ip", "link", "del", self.host_ifname], capture_output=True)
        for ns in reversed(self._netns_made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._netns_made = []
        self.host_ifname = None


def _ip(*args) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {(r.stderr or r.stdout).strip()}")


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(c) for c in f.read().split()}
    except OSError:
        return set()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _netns_collect() -> None:
    """Delete the namespaces (killing what is left in them) that this module made in a process that is gone: one
    killed outright (SIGKILL) cannot run its stop()."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for ns in names:
        m = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-\d+-(?:\d+|hub)", ns)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its maker lives (or its PID was reused: left alone)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        for pid in _netns_pids(ns):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def unavailable_reason(netns: bool = False) -> str | None:
    """Why no cluster can be started here (one line), or None: it needs root, and Slurm (installed if missing);
    netns=True: also `ip` and `nsenter`."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a Slurm test cluster needs root (slurmd runs the jobs)"
    missing = [t for t in NETNS_TOOLS if shutil.which(t) is None] if netns else []
    if missing:
        return f"a Slurm test cluster of network namespaces needs {' and '.join(missing)}, not found"
    return ensure_installed()


def slurm_or_skip(tmp_path_factory, **kw) -> SlurmCluster:
    """A started SlurmCluster(**kw) in a fresh pytest temp dir, or pytest.skip with one line why. Stop it:
        @pytest.fixture(scope="module")
        def slurm(tmp_path_factory):
            cluster = slurm_or_skip(tmp_path_factory)
            yield cluster
            cluster.stop()
    With SLURM_CLUSTER_REQUIRED=1 in the environment, daemons that do not start fail the test instead (network
    namespaces that cannot be made, netns=True, still skip it)."""
    import pytest
    why = unavailable_reason(kw.get("netns", False))
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(**kw)
    try:
        return cluster.start(tmp_path_factory.mktemp("slurm"))
    except (SlurmError, OSError, subprocess.SubprocessError) as e:
        if os.environ.get("SLURM_CLUSTER_REQUIRED") == "1" and not isinstance(e, NetnsUnavailable):
            raise
        pytest.skip(f"the Slurm test cluster did not start: {str(e).splitlines()[0][:300]}")
