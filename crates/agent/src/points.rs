//! Recovery-point tags: crash-consistent tags on a timer, app-consistent tags between the
//! machine's freeze and thaw hooks, and multi-machine (group) tags with a prepare/commit between
//! the agents of a replication group.
//!
//! A tag is a record in the machine's ordered stream, so its position k is a point shared by all
//! disks of the machine. A group tag is a point for the group only when every member committed it:
//! a member holds its writes from its prepare until commit/abort, so all members' prepare
//! positions form one consistent cut; the master target lists the tag only once it finds the
//! commit in every member's stream (a member that failed or was killed leaves no partial point).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use ferry_api::agent::{GroupAnswer, GroupPointRequest, GroupReport, TagTaken};
use ferry_api::Method;
use ferry_protocol::{codes, now_ms, RecordBody, TagKind};
use ferry_status::{ok, Failure, JsonBody, Reply};

use crate::machine::{push_event, Machine, WriteHold};
use crate::AgentError;

/// Run a hook with `sh -c`, killing it after `timeout`.
fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what} hook {cmd:?} could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if status.success() {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{what} hook {cmd:?} failed ({status}): {}", err.trim()));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} hook {cmd:?} did not finish within {:.0} s and was killed",
                    timeout.as_secs_f64()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{what} hook {cmd:?}: {e}")),
        }
    }
}

impl Machine {
    fn hook_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.config.hook_timeout_secs.max(0.1))
    }

    fn freeze(&self) -> Result<(), String> {
        match &self.config.freeze_command {
            Some(cmd) => run_hook("freeze", cmd, self.hook_timeout()),
            None => Err("no freeze_command is configured, so an app-consistent point cannot be taken: configure freeze_command/thaw_command (e.g. fsfreeze) for this machine".into()),
        }
    }

    fn thaw(&self) {
        if let Some(cmd) = &self.config.thaw_command {
            if let Err(e) = run_hook("thaw", cmd, self.hook_timeout()) {
                let mut c = self.lock();
                push_event(&mut c, "thaw-failed", format!("{e}: applications may still be frozen; thaw them by hand"));
            }
        }
    }

    /// Planned failover: run the freeze hook (applications flush and pause), then refuse every
    /// later write, and say the seq of the last one. Kept in the state file, so a restarted
    /// agent refuses writes before it serves its disks. Repeating an order changes nothing.
    pub fn quiesce(&self, order: &str) {
        let _op = self.quiesce_op.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock().quiesced.as_ref().is_some_and(|q| q.order == order) {
            return;
        }
        let froze = self.freeze();
        let mut c = self.lock();
        let (frozen, message) = match froze {
            Ok(()) => (true, None),
            Err(e) => (false, Some(format!("{e}; writes are refused from now on instead"))),
        };
        let q = ferry_api::agent::Quiesced {
            order: order.to_owned(),
            last_seq: c.last_seq(),
            at_ms: now_ms(),
            frozen,
            message,
        };
        push_event(
            &mut c,
            "quiesced",
            format!("quiesced for failover {order}: the last write is seq {}; later writes are refused", q.last_seq),
        );
        c.set_quiesced(Some(q));
        if let Err(e) = self.save_state(&c) {
            // Refused in memory all the same; only a restart would forget it.
            push_event(&mut c, "quiesce-not-saved", format!("the quiesce could not be saved: {e}"));
        }
    }

    /// Lift a quiesce (the failover was cancelled): writes are taken again, applications thawed.
    pub fn lift_quiesce(&self) {
        let _op = self.quiesce_op.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = self.lock().quiesced.clone() else { return };
        {
            let mut c = self.lock();
            c.set_quiesced(None);
            if let Err(e) = self.save_state(&c) {
                push_event(&mut c, "quiesce-not-saved", format!("lifting the quiesce could not be saved: {e}"));
            }
        }
        if q.frozen {
            self.thaw();
        }
        let mut c = self.lock();
        push_event(&mut c, "quiesce-lifted", format!("quiesce of failover {} lifted: writes are taken again", q.order));
    }

    /// A crash-consistent tag now. Returns its seq.
    pub fn crash_point(&self) -> Result<u64, AgentError> {
        let mut c = self.lock();
        let id = format!("crash-{}", now_ms());
        let seq = self.insert_marker_locked(&mut c, RecordBody::Tag { id, kind: TagKind::CrashConsistent })?;
        c.points.crash_tags += 1;
        c.points.last_crash_tag_seq = Some(seq);
        Ok(seq)
    }

    /// An app-consistent tag: freeze hook, tag, thaw hook. A failing or timed-out freeze gives
    /// an event and no tag (never a false app-consistent point).
    pub fn app_point(&self) -> Result<u64, String> {
        if let Some(q) = self.lock().quiesced.as_ref() {
            // Its freeze and thaw would wake applications the failover paused.
            return Err(format!("no app-consistent point: the machine is quiesced for failover {}", q.order));
        }
        if let Err(e) = self.freeze() {
            self.thaw();
            let mut c = self.lock();
            c.points.app_failures += 1;
            let msg = format!("no app-consistent point: {e}");
            push_event(&mut c, "app-point-failed", msg.clone());
            return Err(msg);
        }
        let result = {
            let mut c = self.lock();
            let id = format!("app-{}", now_ms());
            match self.insert_marker_locked(&mut c, RecordBody::Tag { id, kind: TagKind::AppConsistent }) {
                Ok(seq) => {
                    c.points.app_tags += 1;
                    c.points.last_app_tag_seq = Some(seq);
                    Ok(seq)
                }
                Err(e) => {
                    c.points.app_failures += 1;
                    let msg = format!("no app-consistent point: {e}");
                    push_event(&mut c, "app-point-failed", msg.clone());
                    Err(msg)
                }
            }
        };
        self.thaw();
        result
    }

    /// Member side of a group tag: (freeze,) hold writes and insert the prepare record.
    pub fn group_prepare(self: &Arc<Self>, req: &GroupRequest) -> Result<u64, String> {
        let mine = self.config.group.as_ref().map(|g| g.name.as_str());
        if mine != Some(req.group.as_str()) {
            return Err(format!(
                "machine {} is not a member of group {:?} (its group: {mine:?})",
                self.name, req.group
            ));
        }
        if let Some(q) = self.lock().quiesced.as_ref() {
            return Err(format!("machine {} is quiesced for failover {}: it joins no group tag", self.name, q.order));
        }
        if self.lock().prepared_tags.contains(&req.tag) {
            return Err(format!("group tag {} was already prepared here: a repeated prepare is refused", req.tag));
        }
        if req.app {
            if let Err(e) = self.freeze() {
                self.thaw();
                return Err(format!("no app-consistent group point: {e}"));
            }
        }
        let refuse = |msg: String| {
            if req.app {
                self.thaw();
            }
            Err(msg)
        };
        if req.deadline_ms != 0 && now_ms() > req.deadline_ms {
            // The coordinator has given up on this tag already (e.g. the freeze was slow).
            return refuse(format!("group tag {} arrived after its prepare deadline: abandoned", req.tag));
        }
        let timeout = Duration::from_millis(req.timeout_ms.clamp(100, 600_000));
        let mut c = self.lock();
        if let Some(h) = c.hold.as_ref().filter(|h| h.until > Instant::now()) {
            let msg = format!("another group tag ({}) is being prepared", h.tag);
            drop(c);
            return refuse(msg);
        }
        match self
            .insert_marker_locked(&mut c, RecordBody::GroupPrepare { group: req.group.clone(), tag: req.tag.clone() })
        {
            Ok(seq) => {
                if c.prepared_tags.len() >= 256 {
                    c.prepared_tags.pop_front();
                }
                c.prepared_tags.push_back(req.tag.clone());
                // Long enough for the commit phase too (as long again as the prepare phase).
                let until = Instant::now() + 2 * timeout;
                if let Some(old) =
                    c.hold.replace(WriteHold { group: req.group.clone(), tag: req.tag.clone(), until, app: req.app })
                {
                    // An expired hold whose expiry thread has not run yet: thaw it here.
                    if old.app {
                        drop(c);
                        self.thaw();
                    }
                }
                let (m, tag) = (self.clone(), req.tag.clone());
                std::thread::spawn(move || expire_hold(m, tag, until));
                Ok(seq)
            }
            Err(e) => {
                drop(c);
                refuse(e.to_string())
            }
        }
    }

    /// Member side: commit (every member prepared) or abort. Writes resume either way.
    pub fn group_finish(&self, req: &GroupRequest, commit: bool) -> Result<Option<u64>, String> {
        let mut c = self.lock();
        let held =
            c.hold.as_ref().is_some_and(|h| h.tag == req.tag && h.group == req.group && h.until > Instant::now());
        if !held {
            return Err(format!(
                "group tag {} is not prepared here (its hold expired after {} ms, or it was never prepared): the tag is abandoned",
                req.tag, req.timeout_ms
            ));
        }
        let app = c.hold.as_ref().is_some_and(|h| h.app);
        let result = if commit {
            let kind = if app { TagKind::AppConsistent } else { TagKind::CrashConsistent };
            let body = RecordBody::GroupCommit {
                group: req.group.clone(),
                tag: req.tag.clone(),
                members: req.members.clone(),
                kind,
            };
            let r = self.insert_marker_locked(&mut c, body).map(Some).map_err(|e| e.to_string());
            if r.is_ok() {
                c.points.group_commits += 1;
                c.points.last_group_tag = Some(req.tag.clone());
            }
            r
        } else {
            c.points.group_aborts += 1;
            Ok(None)
        };
        c.hold = None;
        drop(c);
        self.hold_released.notify_all();
        if app {
            self.thaw();
        }
        result
    }
}

/// Clear a hold nobody committed or aborted in time, and thaw what its prepare froze.
fn expire_hold(m: Arc<Machine>, tag: String, until: Instant) {
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let mut c = m.lock();
    if !c.hold.as_ref().is_some_and(|h| h.tag == tag && h.until == until) {
        return; // committed, aborted or replaced
    }
    let Some(h) = c.hold.take() else { return };
    c.points.group_aborts += 1;
    push_event(
        &mut c,
        "group-tag-expired",
        format!(
            "group tag {} of {} was neither committed nor aborted in time: writes resumed without it",
            h.tag, h.group
        ),
    );
    drop(c);
    m.hold_released.notify_all();
    if h.app {
        m.thaw();
    }
}

pub use ferry_api::agent::GroupRequest;

/// Coordinator: one group tag over every member. All prepared in time → commit everywhere;
/// otherwise abort everywhere. Returns a report.
pub async fn group_round(m: Arc<Machine>, app: bool) -> Result<GroupReport, String> {
    let Some(g) = m.config.group.clone() else {
        return Err(format!("machine {} has no [group] configured", m.name));
    };
    if !g.coordinator {
        return Err(format!("machine {} is not the coordinator of group {}", m.name, g.name));
    }
    let timeout = Duration::from_secs_f64(g.prepare_timeout_secs.max(0.1));
    // Every request to a member is signed; without the key no member would accept one.
    let signer = match g.coordinator_key.as_deref() {
        Some(k) => Arc::new(ferry_status::control::GroupSigner::from_hex(k)?),
        None => return Err(format!("group {} has no coordinator_key on its coordinator {}", g.name, m.name)),
    };
    let tag = format!("{}-{}", g.name, now_ms());
    let mut req = GroupRequest {
        group: g.name.clone(),
        tag: tag.clone(),
        app,
        timeout_ms: timeout.as_millis() as u64,
        members: Vec::new(),
        deadline_ms: now_ms() + timeout.as_millis() as u64,
    };
    // Prepare everywhere at once, the coordinator's own machine included.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = Vec::new();
    for addr in &g.members {
        let (addr, body, signer) = (addr.clone(), req.clone(), signer.clone());
        tasks.push(tokio::spawn(async move {
            let call = ferry_status::call_signed::<GroupAnswer>(&addr, &signer, Method::Post, "/group/prepare", &body);
            let r = match tokio::time::timeout_at(deadline, call).await {
                Err(_) => Err("did not prepare in time".to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(a)) => Ok(a.machine),
            };
            (addr, r)
        }));
    }
    let (m2, r2) = (m.clone(), req.clone());
    let local = tokio::task::spawn_blocking(move || m2.group_prepare(&r2));
    let mut failures = Vec::new();
    let mut prepared = Vec::new();
    let mut prepared_addrs = Vec::new();
    match tokio::time::timeout_at(deadline, local).await {
        Ok(Ok(Ok(_))) => prepared.push(m.name.to_string()),
        Ok(Ok(Err(e))) => failures.push(format!("{}: {e}", m.name)),
        _ => failures.push(format!("{}: did not prepare in time", m.name)),
    }
    for t in tasks {
        match t.await {
            Ok((addr, Ok(name))) => {
                prepared.push(name);
                prepared_addrs.push(addr);
            }
            Ok((addr, Err(e))) => failures.push(format!("{addr}: {e}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let commit = failures.is_empty();
    req.members = prepared.clone();
    let path = if commit { "/group/commit" } else { "/group/abort" };
    let body = req.clone();
    // Commit (or abort) everywhere at once: every member's hold lasts twice the timeout.
    let mut finish_failures = Vec::new();
    let mut sends = Vec::new();
    for addr in &g.members {
        let (addr, body, path, signer) = (addr.clone(), body.clone(), path.to_owned(), signer.clone());
        sends.push(tokio::spawn(async move {
            let call = ferry_status::call_signed::<GroupAnswer>(&addr, &signer, Method::Post, &path, &body);
            let r = tokio::time::timeout(timeout, call).await;
            (addr, r)
        }));
    }
    for t in sends {
        let Ok((addr, r)) = t.await else { continue };
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if prepared_addrs.contains(&addr) => finish_failures.push(format!("{addr}: {e}")),
            Err(_) if prepared_addrs.contains(&addr) => finish_failures.push(format!("{addr}: no answer")),
            _ => {}
        }
    }
    let (m2, r2) = (m.clone(), req.clone());
    let local = tokio::task::spawn_blocking(move || m2.group_finish(&r2, commit)).await;
    if let Ok(Err(e)) = local {
        if prepared.iter().any(|p| *p == *m.name) {
            finish_failures.push(format!("{}: {e}", m.name));
        }
    }
    let report = GroupReport {
        group: g.name.clone(),
        tag: tag.clone(),
        app,
        committed: commit,
        members: prepared.clone(),
        failures: failures.clone(),
        commit_failures: finish_failures.clone(),
    };
    let mut c = m.lock();
    if !commit {
        let msg = format!("group tag {tag} abandoned (no multi-machine point): {}", failures.join("; "));
        push_event(&mut c, "group-tag-failed", msg.clone());
        return Err(msg);
    }
    if !finish_failures.is_empty() {
        push_event(
            &mut c,
            "group-tag-incomplete",
            format!(
                "group tag {tag}: the commit did not reach {}; the master target will not list it as a multi-machine point",
                finish_failures.join("; ")
            ),
        );
    }
    Ok(report)
}

/// Timers: crash-consistent and app-consistent tags, and the group's tags on its coordinator.
pub(crate) fn spawn_timers(m: Arc<Machine>, shutdown: tokio_util::sync::CancellationToken) {
    let every = |secs: f64| (secs > 0.0).then(|| Duration::from_secs_f64(secs.max(0.05)));
    let crash = every(m.config.crash_point_interval_secs);
    let app = every(m.config.app_point_interval_secs).filter(|_| m.config.freeze_command.is_some());
    let group = m.config.group.clone().filter(|g| g.coordinator);
    let gcrash = group.as_ref().and_then(|g| every(g.crash_interval_secs));
    let gapp = group.as_ref().and_then(|g| every(g.app_interval_secs));
    if let Some(d) = crash {
        let (m, sd) = (m.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = sd.cancelled() => return, _ = tokio::time::sleep(d) => {} }
                let m2 = m.clone();
                // Outside in-order replication (initial sync, resync) a tag is no point: skip.
                let _ = tokio::task::spawn_blocking(move || m2.crash_point()).await;
            }
        });
    }
    if let Some(d) = app {
        let (m, sd) = (m.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = sd.cancelled() => return, _ = tokio::time::sleep(d) => {} }
                let m2 = m.clone();
                let _ = tokio::task::spawn_blocking(move || m2.app_point()).await;
            }
        });
    }
    for (d, is_app) in [(gcrash, false), (gapp, true)] {
        let Some(d) = d else { continue };
        let (m, sd) = (m.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = sd.cancelled() => return, _ = tokio::time::sleep(d) => {} }
                if let Err(e) = group_round(m.clone(), is_app).await {
                    tracing::warn!(error = %e, "group tag failed");
                }
            }
        });
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Failure::internal(e.to_string()))
}

pub(crate) async fn take_crash(State(m): State<Arc<Machine>>) -> Reply<TagTaken> {
    match blocking(move || m.crash_point()).await? {
        Ok(seq) => ok(TagTaken { seq, kind: "crash".into() }),
        Err(e) => Err(Failure::with_status(
            StatusCode::CONFLICT,
            codes::NOT_REPLICATING,
            e.to_string(),
            "retry once the agent reports caught_up",
        )),
    }
}

pub(crate) async fn take_app(State(m): State<Arc<Machine>>) -> Reply<TagTaken> {
    match blocking(move || m.app_point()).await? {
        Ok(seq) => ok(TagTaken { seq, kind: "app".into() }),
        Err(e) => Err(Failure::with_status(
            StatusCode::CONFLICT,
            codes::HOOK_FAILED,
            e,
            "check the freeze/thaw hooks (run them by hand), and that the agent is caught up",
        )),
    }
}

/// The body is optional (`{}` or none: a crash-consistent group tag).
pub(crate) async fn take_group(State(m): State<Arc<Machine>>, body: axum::body::Bytes) -> Reply<GroupReport> {
    let app = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<GroupPointRequest>(&body) {
            Ok(r) => r.app,
            Err(e) => {
                return Err(Failure::with_status(
                    StatusCode::BAD_REQUEST,
                    codes::BAD_REQUEST,
                    format!("bad group point request: {e}"),
                    "send nothing, or JSON {\"app\": true|false}",
                ))
            }
        }
    };
    match group_round(m, app).await {
        Ok(v) => ok(v),
        Err(e) => Err(Failure::with_status(
            StatusCode::CONFLICT,
            codes::GROUP_TAG_FAILED,
            e,
            "check that every member's agent is running, caught up and reachable, then retry",
        )),
    }
}

pub(crate) async fn prepare(
    State(m): State<Arc<Machine>>,
    JsonBody(req): JsonBody<GroupRequest>,
) -> Reply<GroupAnswer> {
    let m2 = m.clone();
    match blocking(move || m2.group_prepare(&req)).await? {
        Ok(seq) => ok(GroupAnswer { machine: m.name.to_string(), seq: Some(seq) }),
        Err(e) => Err(Failure::with_status(
            StatusCode::CONFLICT,
            codes::GROUP_TAG_FAILED,
            e,
            "retry the group tag once this member is caught up",
        )),
    }
}

pub(crate) async fn commit(State(m): State<Arc<Machine>>, JsonBody(req): JsonBody<GroupRequest>) -> Reply<GroupAnswer> {
    finish(m, req, true).await
}

pub(crate) async fn abort(State(m): State<Arc<Machine>>, JsonBody(req): JsonBody<GroupRequest>) -> Reply<GroupAnswer> {
    finish(m, req, false).await
}

async fn finish(m: Arc<Machine>, req: GroupRequest, commit: bool) -> Reply<GroupAnswer> {
    let m2 = m.clone();
    match blocking(move || m2.group_finish(&req, commit)).await? {
        Ok(seq) => ok(GroupAnswer { machine: m.name.to_string(), seq }),
        Err(e) => Err(Failure::with_status(StatusCode::CONFLICT, codes::GROUP_TAG_FAILED, e, "take a new group tag")),
    }
}
