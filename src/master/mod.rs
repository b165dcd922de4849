//! The master process: one loop, like gunicorn's Arbiter and nginx's
//! master cycle. Signal handlers only record the signal (tokio's self-pipe);
//! reaping, respawning, reloads, stops, the control socket and ZooKeeper
//! are all driven from its loop (`Master::run`). Its state machines have
//! files of their own: `reload.rs` and `stop.rs`. The kill-and-reap steps themselves
//! live in [`crate::pool`].

mod conns;
mod observe;
mod reload;
mod stop;
mod upgrade;

use reload::ReloadOp;
use stop::StopOp;

use crate::config::{Config, InProcess};
use crate::control::{self, Acl, Command as Ctl, Reply};
use crate::handover;
use crate::notify;
use crate::sockets::{self, Origin, Passed};
use crate::pool::{Backoff, Pool, Reaped, WState, Worker};
use crate::registry::{self, ZkState};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

const TICK: Duration = Duration::from_millis(100);

type Responder = oneshot::Sender<Reply>;

enum WorkerMsg {
    Ready,
    Heartbeat { requests: u64, connections: u64 },
    /// Its handler processes, by pool.
    Handlers(std::collections::BTreeMap<String, Vec<i32>>),
    /// It cannot start (a handler could not start or failed its warmup).
    Fail(String),
    /// The handler processes it reaped before exiting.
    Reaped(Vec<Value>),
    /// A connection handed over for a restart.
    Conn(handover::Conn),
    /// Its channel closed (it has exited): all it said has been read.
    Closed,
}

/// How long a reaped worker's last reports may lag behind its exit.
const LAST_WORDS: Duration = Duration::from_millis(500);

struct Slot {
    backoff: Backoff,
    respawn_at: Option<Instant>,
}

/// One generation of workers: a config, a listener and its slots.
struct Gen {
    id: u64,
    cfg: Config,
    addr: SocketAddr,
    /// None once the daemon stops accepting.
    listener: Option<Rc<TcpListener>>,
    /// Where the listener came from.
    origin: Origin,
    slots: Vec<Slot>,
}

impl Gen {
    fn new(id: u64, cfg: Config, addr: SocketAddr, listener: Rc<TcpListener>, origin: Origin) -> Gen {
        let n = cfg.server.workers.resolve();
        let now = Instant::now();
        let slots = (0..n).map(|_| Slot { backoff: Backoff::default(), respawn_at: Some(now) }).collect();
        Gen { id, cfg, addr, listener: Some(listener), origin, slots }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Starting,
    Serving,
    Stopping,
}

pub struct Master {
    config_path: PathBuf,
    /// What this binary serves in-process (for validating reloads).
    in_process: InProcess,
    /// Why the start failed (the daemon then stops and exits 1).
    start_failure: Option<String>,
    /// Workers reaped before their channel closed: they are finished once
    /// their last reports (the handlers they reaped) have been read.
    exited: Vec<(Reaped, Worker, Instant)>,
    /// Orphans already sent SIGKILL (not yet reaped).
    orphans_killed: std::collections::BTreeSet<i32>,
    cur: Gen,
    next_gen_id: u64,
    pool: Pool,
    phase: Phase,
    reload: Option<ReloadOp>,
    queued_reload: Option<Vec<Responder>>,
    stop: Option<StopOp>,
    started: Instant,
    started_unix: u64,
    events: mpsc::UnboundedSender<(i32, WorkerMsg)>,
    acl: watch::Sender<Acl>,
    zk: Option<registry::Handle>,
    zk_status: registry::Status,
    watchdog: Option<(Duration, Instant)>,
    last_status: String,
    exit_code: Option<i32>,
    /// The master's end of each worker's channel, for passing connections.
    /// (Connections queued to one worker go out in order, one at a time.)
    chans: HashMap<i32, (Arc<tokio::net::UnixStream>, mpsc::UnboundedSender<handover::Conn>)>,
    /// Round robin over the workers that take handed-over connections.
    next_taker: usize,
    /// Connections the previous instance handed over, until the first
    /// generation is ready to take them: (store name, connection).
    adopted: Vec<(String, handover::Conn)>,
    /// The node last written to the store's registration memfd.
    stored_node: Option<String>,
    /// The binary's path (what an upgrade execs), and argv[0].
    exe: PathBuf,
    arg0: std::ffi::OsString,
    /// The control listener's descriptor (for an upgrade).
    ctl_fd: std::os::fd::RawFd,
    upgrade: upgrade::UpgradeInfo,
    /// An upgrade's exec, due once its reply is written.
    exec_pending: Option<oneshot::Receiver<()>>,
    /// `/metrics` (SPEC §8), and the scrapes it passes to the loop (taken by `run`).
    metrics: observe::Endpoint,
    scrapes: Option<mpsc::UnboundedReceiver<crate::metrics::http::Scrape>>,
    counters: observe::Counters,
    /// Readings of the counts, for `status`'s last minute.
    window: crate::metrics::Window,
}

/// Binds the TCP listener: SO_REUSEADDR, a real backlog.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Runs the daemon until it stops. Returns the exit code.
pub fn run(config_path: PathBuf, cfg: Config, in_process: InProcess, nofile: Option<crate::limits::Nofile>) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let upgraded = match upgrade::take_state() {
            None => None,
            Some(Ok(st)) => Some(st),
            Some(Err(e)) => {
                // Its descriptors are unknown: exit, and let the service
                // manager start us again (with the fd store).
                log::error!("upgrade: {e}");
                return 1;
            }
        };
        match Master::start(config_path.clone(), cfg, in_process, upgraded.as_ref(), nofile).await {
            Ok((mut m, rx, ctl_rx, zk_rx)) => {
                if let Some(st) = &upgraded {
                    m.adopt_upgrade(st);
                }
                m.run(rx, ctl_rx, zk_rx).await
            }
            Err(e) => {
                if let Some(st) = upgraded {
                    let err = upgrade::fall_back(st, &e, &config_path);
                    log::error!("upgrade: cannot go back to the previous binary either: {err}");
                }
                log::error!("{e}");
                eprintln!("rpcd: {e}");
                1
            }
        }
    })
}

type Started = (
    Master,
    mpsc::UnboundedReceiver<(i32, WorkerMsg)>,
    mpsc::UnboundedReceiver<control::Request>,
    mpsc::UnboundedReceiver<registry::Status>,
);

impl Master {
    async fn start(
        config_path: PathBuf,
        cfg: Config,
        in_process: InProcess,
        upgraded: Option<&upgrade::State>,
        nofile: Option<crate::limits::Nofile>,
    ) -> Result<Started, String> {
        // Sockets passed by the service manager (its fd store, or a .socket
        // unit) are adopted where they match the config; the rest is closed.
        // An upgrade's new image has them from the previous image.
        let mut passed = if upgraded.is_some() { Passed::default() } else { Passed::from_env() };
        let (ctl_listener, ctl_origin) = match (upgraded, passed.take_control(&cfg.control.socket)) {
            (Some(st), _) => {
                // SAFETY: the previous image passed this descriptor for us.
                let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(st.control_fd) };
                (control::adopt(l, &cfg.control)?, Origin::Store)
            }
            (None, Some((l, origin))) => (control::adopt(l, &cfg.control)?, origin),
            (None, None) => (control::bind(&cfg.control)?, Origin::Bound),
        };
        let ctl_fd = std::os::fd::AsRawFd::as_raw_fd(&ctl_listener);
        let bound = (|| {
            let addr = cfg.listen_addr();
            let taken = match upgraded {
                Some(st) => Some(upgrade::listener_of(st)),
                None => passed.take_listener(addr),
            };
            let (listener, origin) = match taken {
                Some((l, origin)) => {
                    // The backlog of this config (listen() again updates it).
                    let _ = socket2::SockRef::from(&l).listen(cfg.server.backlog.min(i32::MAX as u32) as i32);
                    (l, origin)
                }
                None => (bind_listener(addr, cfg.server.backlog).map_err(|e| format!("cannot listen on {addr}: {e}"))?, Origin::Bound),
            };
            let addr = listener.local_addr().unwrap_or(addr);
            if cfg.zookeeper.enabled {
                registry::advertised(&cfg, addr)?;
            }
            Ok::<_, String>((listener, addr, origin))
        })();
        let (adopted, mut previous_node) = conns::take_handover(&mut passed, &cfg);
        if let Some(st) = upgraded.filter(|st| st.zk_hosts == cfg.zookeeper.hosts) {
            previous_node = st.zk_node.clone();
        }
        passed.discard();
        let (listener, addr, origin) = match bound {
            Ok(b) => b,
            Err(e) => {
                // Leave no socket file behind for a daemon that never ran.
                if ctl_origin == Origin::Bound {
                    let _ = std::fs::remove_file(&cfg.control.socket);
                }
                return Err(e);
            }
        };
        // Into the store at once, so that a restart (or a crash restart)
        // finds them there: connects wait in the backlog meanwhile.
        if origin == Origin::Bound && upgraded.is_none() {
            sockets::store(sockets::LISTEN_NAME, &listener);
        }
        if ctl_origin == Origin::Bound && upgraded.is_none() {
            sockets::store(sockets::CONTROL_NAME, &ctl_listener);
        }
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (zk_tx, zk_rx) = mpsc::unbounded_channel();
        let (acl_tx, acl_rx) = watch::channel(Acl::from_config(&cfg.control));
        tokio::spawn(control::serve(ctl_listener, ctl_tx, acl_rx));
        let zk = cfg.zookeeper.enabled.then(|| registry::Handle::start(&cfg.zookeeper, cfg.secrets.zk_auth.clone(), zk_tx, previous_node.clone()));
        let zk_state = if zk.is_some() { ZkState::Connecting } else { ZkState::Disabled };
        let watchdog = notify::watchdog_interval().map(|d| (d / 2, Instant::now()));
        log::info!(
            "rpcd {} starting: pid {}, listening on {addr} ({}), {} worker(s), config {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            origin.as_str(),
            cfg.server.workers.resolve(),
            config_path.display()
        );
        for w in cfg.warnings() {
            log::warn!("config: {w}");
        }
        match nofile {
            Some(n) => {
                log::info!("descriptors: RLIMIT_NOFILE soft {} (was {}), hard {}", n.soft, n.was, n.hard);
                if let Some(w) = crate::limits::check(&cfg, n.soft) {
                    log::warn!("config: {w}");
                }
            }
            None => log::warn!("descriptors: cannot read or raise RLIMIT_NOFILE"),
        }
        crate::pool::cloexec_inherited();
        // Handler processes orphaned by a worker that died are re-parented
        // to the master (not to init), which kills and reaps them.
        // SAFETY: prctl with constant arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let (metrics, scrapes) = observe::Endpoint::new();
        let mut m = Master {
            config_path,
            in_process,
            start_failure: None,
            exited: Vec::new(),
            orphans_killed: Default::default(),
            cur: Gen::new(1, cfg, addr, Rc::new(listener), origin),
            next_gen_id: 2,
            pool: Pool::default(),
            phase: Phase::Starting,
            reload: None,
            queued_reload: None,
            stop: None,
            started: Instant::now(),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            events: ev_tx,
            acl: acl_tx,
            zk,
            zk_status: registry::Status { state: zk_state, node: None, event: None },
            watchdog,
            last_status: String::new(),
            exit_code: None,
            chans: HashMap::new(),
            next_taker: 0,
            adopted,
            stored_node: previous_node,
            exe: upgrade::own_path(),
            arg0: std::env::args_os().next().unwrap_or_else(|| "rpcd".into()),
            ctl_fd,
            upgrade: Default::default(),
            exec_pending: None,
            metrics,
            scrapes: Some(scrapes),
            counters: Default::default(),
            window: Default::default(),
        };
        m.apply_metrics_listen();
        Ok((m, ev_rx, ctl_rx, zk_rx))
    }

    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<(i32, WorkerMsg)>,
        mut ctl: mpsc::UnboundedReceiver<control::Request>,
        mut zk: mpsc::UnboundedReceiver<registry::Status>,
    ) -> i32 {
        let (mut sigchld, mut sigterm, mut sigint, mut sighup) = match (
            signal(SignalKind::child()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
            _ => {
                log::error!("cannot install signal handlers");
                return 1;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scrapes = self.scrapes.take().expect("run once");
        self.advance();
        while self.exit_code.is_none() {
            tokio::select! {
                _ = sigchld.recv() => self.on_reap(),
                _ = sigterm.recv() => self.on_sigterm(),
                _ = sigint.recv() => { log::info!("SIGINT: graceful stop"); self.begin_stop(None, false) }
                _ = sighup.recv() => { log::info!("SIGHUP: reload"); self.request_reload(None) }
                Some((pid, msg)) = events.recv() => self.on_worker_msg(pid, msg),
                Some(req) = ctl.recv() => self.on_control(req),
                Some(st) = zk.recv() => self.on_zk(st),
                Some(s) = scrapes.recv() => self.on_scrape(s),
                _ = tick.tick() => self.on_tick(),
            }
            self.advance();
            if let Some(written) = self.exec_pending.take() {
                self.do_upgrade(written).await;
            }
        }
        self.finish_stop().await
    }

    // ---- events ----

    fn on_reap(&mut self) {
        let reaped = self.pool.reap();
        if reaped.iter().any(|(_, w)| w.is_some()) {
            // A worker that died may have left handler processes: they are
            // ours now (subreaper). Their exits come through here too.
            self.kill_orphans();
        }
        for (r, w) in reaped {
            let Some(w) = w else {
                log::info!("reaped orphaned child {}: {}", r.pid, r.status);
                continue;
            };
            if w.channel_closed {
                self.finish_worker(r, w);
            } else {
                self.exited.push((r, w, Instant::now()));
            }
        }
    }

    /// Finishes the exits whose channel has not closed within [`LAST_WORDS`].
    fn finish_late_exits(&mut self) {
        let now = Instant::now();
        while let Some(i) = self.exited.iter().position(|(_, _, at)| now.duration_since(*at) >= LAST_WORDS) {
            let (r, w, _) = self.exited.remove(i);
            self.finish_worker(r, w);
        }
    }

    /// A worker has exited and all it reported has been read: record it for
    /// the stop or reload under way, or start its slot again.
    fn finish_worker(&mut self, r: Reaped, w: Worker) {
        self.chans.remove(&r.pid);
        let with_handlers = |r: Reaped| {
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if !w.reaped_handlers.is_empty() || !w.handlers.is_empty() {
                v["handlers"] = Value::Array(w.reaped_handlers.clone());
            }
            v
        };
        if let Some(stop) = &mut self.stop {
            log::info!("worker {} {}", r.pid, r.status);
            stop.reaped.push(with_handlers(r));
            return;
        }
        if w.state == WState::Draining {
            log::info!("retired worker {} {}", r.pid, r.status);
            if let Some(op) = &mut self.reload {
                if op.old_pids.contains(&r.pid) {
                    op.reaped.push(with_handlers(r));
                }
            }
            return;
        }
        // An unexpected exit: respawn in its slot, with backoff.
        let gen = if w.generation == self.cur.id {
            Some(&mut self.cur)
        } else {
            self.reload.as_mut().and_then(|op| op.next.as_mut()).filter(|g| g.id == w.generation)
        };
        let Some(gen) = gen else {
            log::warn!("worker {} of old generation {} {}", r.pid, w.generation, r.status);
            return;
        };
        let slot = &mut gen.slots[w.slot];
        let delay = slot.backoff.exited(w.spawned.elapsed());
        let restarts = slot.backoff.restarts;
        *self.counters.worker_restarts.entry(crate::metrics::worker_reason(&r.status, w.killed_for)).or_default() += 1;
        slot.respawn_at = Some(Instant::now() + delay);
        log::warn!(
            "worker {} (slot {}) {} after {:.1}s; respawning in {:.1}s (restart {})",
            r.pid,
            w.slot,
            r.status,
            w.spawned.elapsed().as_secs_f64(),
            delay.as_secs_f64(),
            restarts
        );
    }

    /// Kills the children of the master that are not workers: handler
    /// processes (and what they started) whose worker died and left them
    /// to us. They normally die with their worker (PR_SET_PDEATHSIG); this
    /// catches the rest, and their process groups.
    fn kill_orphans(&mut self) {
        let me = std::process::id() as i32;
        let mut kids = Vec::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                    kids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
                }
            }
        }
        self.orphans_killed.retain(|p| kids.contains(p));
        for pid in kids {
            if pid == me || self.pool.workers.contains_key(&pid) || !self.orphans_killed.insert(pid) {
                continue;
            }
            log::warn!("killing orphaned process {pid} (a handler whose worker died, or its child)");
            let target = match nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) {
                Ok(g) if g.as_raw() == pid => crate::pool::Target::Group(pid),
                _ => crate::pool::Target::Process(pid),
            };
            target.send(nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn on_worker_msg(&mut self, pid: i32, msg: WorkerMsg) {
        // (Read before or after the worker was reaped, alike.)
        let msg = match msg {
            WorkerMsg::Conn(c) => return self.handed_over(c),
            m => m,
        };
        if let Some(i) = self.exited.iter().position(|(_, w, _)| w.pid == pid) {
            // Reaped already: its last words.
            match msg {
                WorkerMsg::Reaped(r) => self.exited[i].1.reaped_handlers = r,
                WorkerMsg::Closed => {
                    let (r, w, _) = self.exited.remove(i);
                    self.finish_worker(r, w);
                }
                _ => {}
            }
            return;
        }
        let Some(w) = self.pool.workers.get_mut(&pid) else { return };
        w.last_seen = Instant::now();
        match msg {
            WorkerMsg::Ready => {
                if w.state == WState::Starting {
                    w.state = WState::Serving;
                    log::info!("worker {pid} (generation {}, slot {}) is accepting", w.generation, w.slot);
                }
            }
            WorkerMsg::Heartbeat { requests, connections } => {
                w.requests = requests;
                w.connections = connections;
            }
            WorkerMsg::Handlers(h) => w.handlers = h,
            WorkerMsg::Closed => w.channel_closed = true,
            WorkerMsg::Reaped(r) => w.reaped_handlers = r,
            WorkerMsg::Conn(_) => {}
            WorkerMsg::Fail(why) => {
                let (generation, slot) = (w.generation, w.slot);
                log::error!("worker {pid} (generation {generation}, slot {slot}) cannot start: {why}");
                self.worker_failed(pid, generation, why);
            }
        }
    }

    /// A worker reported that it cannot start: a reload's new generation
    /// makes the reload fail; the first generation makes the start fail.
    fn worker_failed(&mut self, pid: i32, generation: u64, why: String) {
        if self.reload.as_ref().and_then(|op| op.next.as_ref()).is_some_and(|g| g.id == generation) {
            self.abort_reload(&format!("a worker of generation {generation} cannot start: {why}"));
            return;
        }
        if self.phase == Phase::Starting && generation == self.cur.id && self.start_failure.is_none() {
            let msg = format!("cannot start: {why}");
            eprintln!("rpcd: {msg}");
            self.start_failure = Some(msg);
            self.pool.kill_now(pid, "failed to start");
            self.begin_stop(None, false);
        }
    }

    fn on_control(&mut self, req: control::Request) {
        match req.cmd {
            Ctl::Status => {
                let v = self.status_json();
                let _ = req.reply.send(Reply { value: v, written: None });
            }
            Ctl::Stop { restart } => {
                log::info!("{} requested on the control socket", if restart { "stop for a restart" } else { "stop" });
                self.begin_stop(Some(req.reply), restart);
            }
            Ctl::Reload => {
                log::info!("reload requested on the control socket");
                self.request_reload(Some(req.reply));
            }
            Ctl::Upgrade => {
                log::info!("upgrade requested on the control socket");
                self.request_upgrade(req.reply);
            }
        }
    }

    fn on_zk(&mut self, st: registry::Status) {
        if let Some(e) = st.event {
            *self.counters.zk_events.entry(e).or_default() += 1;
        }
        if st.state != self.zk_status.state || st.node != self.zk_status.node {
            log::debug!("zookeeper state: {:?} {}", st.state, st.node.as_deref().unwrap_or(""));
        }
        self.zk_status = st;
        // A restart (or a crash restart) finds our node in the store, and
        // the next instance deletes it once its own node exists.
        if self.zk_status.state == ZkState::Registered && self.zk_status.node.is_some() && self.zk_status.node != self.stored_node {
            let node = self.zk_status.node.clone().unwrap_or_default();
            let text = json!({"node": node, "hosts": self.cur.cfg.zookeeper.hosts}).to_string();
            match handover::memfd("rpcd-zk", &text) {
                Ok(fd) => {
                    notify::remove_stored(handover::ZK_NAME);
                    sockets::store(handover::ZK_NAME, &fd);
                    self.stored_node = Some(node);
                }
                Err(e) => log::warn!("cannot keep the registration for a restart: {e}"),
            }
        }
    }

    /// SIGTERM: a restart job of the service manager's gets the handover,
    /// any other the graceful stop.
    fn on_sigterm(&mut self) {
        if self.stop.is_some() {
            log::info!("SIGTERM again");
            return self.begin_stop(None, false);
        }
        let restart = handover::restart_pending(Duration::from_millis(1500));
        log::info!("SIGTERM: {}", if restart { "restart (systemd restart job): handing over" } else { "graceful stop" });
        self.begin_stop(None, restart);
    }

    fn on_tick(&mut self) {
        notify::flush();
        self.on_reap(); // belt and braces: a lost SIGCHLD must not leave a zombie
        self.finish_late_exits();
        let now = Instant::now();
        self.pool.enforce_deadlines(now);
        let hb_timeout = Duration::from_secs(self.cur.cfg.server.heartbeat_timeout_secs);
        let ready_timeout = Duration::from_secs(self.cur.cfg.server.ready_timeout_secs);
        let mut kill = Vec::new();
        for w in self.pool.workers.values() {
            match w.state {
                WState::Serving if now.duration_since(w.last_seen) > hb_timeout => {
                    kill.push((w.pid, "heartbeat", format!("no heartbeat for {:.1}s", now.duration_since(w.last_seen).as_secs_f64())))
                }
                WState::Starting if now.duration_since(w.spawned) > ready_timeout => {
                    kill.push((w.pid, "not_ready", format!("not accepting within {}s", ready_timeout.as_secs())))
                }
                _ => {}
            }
        }
        for (pid, reason, why) in kill {
            if let Some(w) = self.pool.workers.get_mut(&pid) {
                w.killed_for = Some(reason);
            }
            self.pool.kill_now(pid, &why);
        }
        self.sample_window(now);
        if let Some((every, next)) = self.watchdog {
            if now >= next {
                if self.healthy() {
                    notify::watchdog();
                }
                self.watchdog = Some((every, now + every));
            }
        }
    }

    // ---- state machine ----

    fn healthy(&self) -> bool {
        self.phase == Phase::Stopping || self.gen_ready(&self.cur)
    }

    fn live_worker(&self, gen: u64, slot: usize) -> Option<&Worker> {
        self.pool.workers.values().find(|w| w.generation == gen && w.slot == slot && w.state != WState::Draining)
    }

    fn gen_ready(&self, gen: &Gen) -> bool {
        (0..gen.slots.len()).all(|i| self.live_worker(gen.id, i).is_some_and(|w| w.state == WState::Serving))
    }

    fn spawn_due(&mut self, which_next: bool) {
        let now = Instant::now();
        let gen = if which_next {
            match self.reload.as_ref().and_then(|op| op.next.as_ref()) {
                Some(g) => g,
                None => return,
            }
        } else {
            &self.cur
        };
        let due: Vec<usize> = (0..gen.slots.len())
            .filter(|&i| gen.slots[i].respawn_at.is_some_and(|t| t <= now) && self.live_worker(gen.id, i).is_none())
            .collect();
        if due.is_empty() {
            return;
        }
        let Some(listener) = gen.listener.clone() else { return };
        let (cfg, id) = (gen.cfg.clone(), gen.id);
        // A start or a reload fails when its workers' handlers cannot
        // start; a worker replacing a crashed one serves anyway.
        let strict = which_next || self.phase == Phase::Starting;
        for i in due {
            match self.pool.spawn(&cfg, &listener, id, i, strict) {
                Ok((pid, chan)) => {
                    log::info!("started worker {pid} (generation {id}, slot {i})");
                    self.watch_channel(pid, chan);
                    let gen = if which_next { self.reload.as_mut().and_then(|op| op.next.as_mut()).unwrap() } else { &mut self.cur };
                    gen.slots[i].respawn_at = None;
                }
                Err(e) => {
                    log::error!("cannot start a worker: {e}; retrying in 1s");
                    let gen = if which_next { self.reload.as_mut().and_then(|op| op.next.as_mut()).unwrap() } else { &mut self.cur };
                    gen.slots[i].respawn_at = Some(now + Duration::from_secs(1));
                }
            }
        }
    }

    fn watch_channel(&mut self, pid: i32, chan: std::os::unix::net::UnixStream) {
        let tx = self.events.clone();
        if chan.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(chan) = tokio::net::UnixStream::from_std(chan) else { return };
        let chan = Arc::new(chan);
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel::<handover::Conn>();
        self.chans.insert(pid, (chan.clone(), conn_tx));
        let out = chan.clone();
        tokio::spawn(async move {
            while let Some(c) = conn_rx.recv().await {
                let line = handover::conn_line(&c.leftover);
                if let Err(e) = handover::send_with_fd(&out, line.as_bytes(), Some(std::os::fd::AsRawFd::as_raw_fd(&c.fd))).await {
                    log::warn!("cannot pass a connection to worker {pid}: {e}");
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut reader = handover::Reader::default();
            'read: while let Ok(true) = reader.fill(&chan).await {
              while let Some(line) = reader.line() {
                let mut it = line.split_ascii_whitespace();
                let msg = match it.next() {
                    Some("conn") => match (handover::parse_conn(&line), reader.fd()) {
                        (Some(leftover), Some(fd)) => WorkerMsg::Conn(handover::Conn { fd, leftover }),
                        _ => continue,
                    },
                    Some("ready") => WorkerMsg::Ready,
                    Some("hb") => {
                        let requests = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                        let connections = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                        WorkerMsg::Heartbeat { requests, connections }
                    }
                    Some("handlers") => match serde_json::from_str(line["handlers".len()..].trim()) {
                        Ok(h) => WorkerMsg::Handlers(h),
                        Err(_) => continue,
                    },
                    Some("reaped") => match serde_json::from_str(line["reaped".len()..].trim()) {
                        Ok(r) => WorkerMsg::Reaped(r),
                        Err(_) => continue,
                    },
                    Some("fail") => WorkerMsg::Fail(line["fail".len()..].trim().to_string()),
                    _ => continue,
                };
                if tx.send((pid, msg)).is_err() {
                    break 'read;
                }
              }
            }
            let _ = tx.send((pid, WorkerMsg::Closed));
        });
    }

    /// Moves every state machine forward; called after each event.
    fn advance(&mut self) {
        if self.phase != Phase::Stopping {
            self.spawn_due(false);
            self.spawn_due(true);
        }
        if self.phase == Phase::Starting && self.gen_ready(&self.cur) {
            self.phase = Phase::Serving;
            let n = self.cur.slots.len();
            log::info!("ready: {n} worker(s) accepting on {} after {:.0} ms", self.cur.addr, self.started.elapsed().as_secs_f64() * 1000.0);
            notify::ready(&self.status_line());
            self.deliver_adopted();
            if let Some(zk) = &self.zk {
                zk.publish(self.zk_payload());
            }
        }
        self.advance_reload();
        self.advance_stop();
        let line = self.status_line();
        if line != self.last_status {
            notify::status(&line);
            self.last_status = line;
        }
    }

    /// The daemon's state as `status` and `STATUS=` name it.
    fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Starting => "starting",
            Phase::Serving if self.reload.is_some() => "reloading",
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
        }
    }

    fn status_line(&self) -> String {
        let phase = self.state_name();
        let serving = self.pool.workers.values().filter(|w| w.state == WState::Serving).count();
        let zk = match self.zk_status.state {
            ZkState::Disabled => "disabled",
            ZkState::Connecting => "connecting",
            ZkState::Registered => "registered",
            ZkState::Deregistered => "deregistered",
        };
        format!("{phase}: generation {}, {serving}/{} workers serving on {}, zookeeper {zk}", self.cur.id, self.cur.slots.len(), self.cur.addr)
    }

    fn zk_payload(&self) -> Value {
        let (host, port) = registry::advertised(&self.cur.cfg, self.cur.addr)
            .unwrap_or_else(|_| (self.cur.addr.ip().to_string(), self.cur.addr.port()));
        let mut v = json!({
            "host": host,
            "port": port,
            "pid": std::process::id(),
            "workers": self.cur.slots.len(),
            "version": env!("CARGO_PKG_VERSION"),
            "started": self.started_unix,
            "state": "serving",
            "weight": self.cur.cfg.zookeeper.weight,
        });
        // SPEC §9: only when on, so that plain nodes read as before.
        if self.cur.cfg.secrets.tls.is_some() {
            v["tls"] = json!(true);
        }
        v
    }

    /// `status`'s view of `[server.tls]`: off, or on with or without
    /// client certificates (and where the certificate was read from).
    fn tls_json(&self) -> Value {
        let t = &self.cur.cfg.server.tls;
        match &self.cur.cfg.secrets.tls {
            None => json!({"enabled": false}),
            Some(m) => json!({
                "enabled": true,
                "cert": t.cert,
                "client_auth": m.client_ca_pem.is_some(),
            }),
        }
    }

    fn status_json(&self) -> Value {
        let now = Instant::now();
        let workers: Vec<Value> = self
            .pool
            .workers
            .values()
            .map(|w| {
                let restarts = if w.generation == self.cur.id {
                    self.cur.slots.get(w.slot).map(|s| s.backoff.restarts).unwrap_or(0)
                } else {
                    self.reload
                        .as_ref()
                        .and_then(|op| op.next.as_ref())
                        .filter(|g| g.id == w.generation)
                        .and_then(|g| g.slots.get(w.slot))
                        .map(|s| s.backoff.restarts)
                        .unwrap_or(0)
                };
                json!({
                    "pid": w.pid,
                    "state": w.state,
                    "generation": w.generation,
                    "slot": w.slot,
                    "uptime_secs": round3(now.duration_since(w.spawned)),
                    "requests": w.requests,
                    "connections": w.connections,
                    "restarts": restarts,
                    "handlers": w.handlers,
                })
            })
            .collect();
        let backoff: Vec<Value> = self
            .cur
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let at = s.respawn_at?;
                Some(json!({"slot": i, "restarts": s.backoff.restarts, "respawn_in_secs": round3(at.saturating_duration_since(now))}))
            })
            .collect();
        let state = self.state_name();
        json!({
            "ok": true,
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "state": state,
            "uptime_secs": round3(self.started.elapsed()),
            "config": self.config_path,
            "generation": self.cur.id,
            "listen": self.cur.addr.to_string(),
            "listener": self.cur.origin.as_str(),
            "tls": self.tls_json(),
            "exe": self.exe,
            "upgrade": self.upgrade.json(),
            "zookeeper": {"state": self.zk_status.state, "node": self.zk_status.node},
            "workers": workers,
            "backoff": backoff,
            "methods": self.methods_json(),
            "metrics": self.metrics.running.as_ref().map(|(a, _)| format!("http://{a}/metrics")),
        })
    }

}

fn round3(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
