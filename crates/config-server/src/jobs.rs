//! Jobs: every long operation, implemented once. A job is a list of named steps run in order by
//! one task; its state is persisted after every step change, so a restarted server finds every job.
//!
//! Architecture Invariant: after a restart no job stays "in progress" without a task running it:
//! a job whose running step is idempotent (discovery, backup) resumes at that step; one whose
//! running step had an outside effect of unknown outcome (a script action) fails with a reason;
//! a job waiting for input keeps waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_store::Store;

use crate::errors;

pub use ferry_api::config_server::{Job, JobError, JobState, Step, StepState};

pub use ferry_sys::time::now_ms;

/// What a step's work produced.
pub enum Outcome {
    Done(Option<String>),
    /// Stop here until an operator confirms (or cancels).
    WaitForInput(String),
    Failed(JobError),
}

/// The work behind the steps of each job kind.
pub trait Runner: Send + Sync + 'static {
    fn run_step(&self, job: &Job, step: usize, ctl: &JobControl) -> impl std::future::Future<Output = Outcome> + Send;

    /// The job ends without one of its steps failing: cancelled between steps or while it
    /// waited for input, or failed at a restart (a step whose outcome is unknown). Called
    /// before the job is recorded finished (so nothing can claim what it holds meanwhile).
    /// What a failing step gives back, this gives back (a failover's quiesced primary, a plan's
    /// untouched machines).
    fn job_ended(&self, _job: &Job) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
}

/// Handed to running steps: progress reporting and cancellation.
#[derive(Clone)]
pub struct JobControl {
    pub cancel: tokio_util::sync::CancellationToken,
    progress: Arc<Mutex<(u64, u64)>>,
}

impl JobControl {
    pub fn bytes(&self, done: u64, total: u64) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = (done, total);
    }
}

struct Live {
    cancel: tokio_util::sync::CancellationToken,
    /// Confirmations, naming the step they confirm (a late or repeated one confirms nothing else).
    confirm: tokio::sync::mpsc::UnboundedSender<usize>,
}

#[derive(Clone)]
pub struct Jobs {
    store: Store,
    live: Arc<Mutex<HashMap<String, Live>>>,
}

impl Jobs {
    pub fn new(store: Store) -> Jobs {
        Jobs { store, live: Arc::new(Mutex::new(HashMap::new())) }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn save(&self, job: &mut Job) {
        job.updated_ms = now_ms();
        if let Err(e) = self.store.put_job(&job.id, job.state.as_str(), job).await {
            tracing::error!(job = %job.id, error = %e, "cannot persist job");
        }
    }

    /// A fresh job ID (for callers that record it before the job starts).
    pub fn new_id() -> String {
        format!("job-{}-{:04x}", now_ms(), rand::random::<u16>())
    }

    /// Create and start a job.
    pub async fn start<R: Runner>(
        &self,
        runner: Arc<R>,
        kind: &str,
        target: &str,
        steps: Vec<(String, bool)>,
        params: serde_json::Value,
    ) -> Result<Job, ferry_store::StoreError> {
        self.start_with_id(Self::new_id(), runner, kind, target, steps, params).await
    }

    /// [`Jobs::start`] with an ID from [`Jobs::new_id`].
    pub async fn start_with_id<R: Runner>(
        &self,
        id: String,
        runner: Arc<R>,
        kind: &str,
        target: &str,
        steps: Vec<(String, bool)>,
        params: serde_json::Value,
    ) -> Result<Job, ferry_store::StoreError> {
        let mut job = Job {
            id,
            kind: kind.into(),
            target: target.into(),
            state: JobState::Queued,
            steps: steps
                .into_iter()
                .map(|(name, idempotent)| Step {
                    name,
                    state: StepState::Pending,
                    idempotent,
                    message: None,
                    started_ms: None,
                    finished_ms: None,
                })
                .collect(),
            current_step: 0,
            progress_percent: 0.0,
            bytes_done: 0,
            bytes_total: 0,
            eta_secs: None,
            error: None,
            input_prompt: None,
            params,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            finished_ms: None,
            resumes: 0,
        };
        self.store.put_job(&job.id, job.state.as_str(), &job).await?;
        self.spawn(runner, job.clone());
        job.state = JobState::Queued;
        Ok(job)
    }

    /// At start: resume or fail every unfinished job (see the module's invariant).
    pub async fn recover<R: Runner>(&self, runner: Arc<R>, kinds: &[&str]) -> Result<(), ferry_store::StoreError> {
        let open: Vec<Job> = self.store.jobs(Some(&["queued", "in-progress", "waiting-for-input"])).await?;
        for mut job in open {
            if !kinds.contains(&job.kind.as_str()) {
                let msg = format!(
                    "this server does not know job kind {:?} any more (a downgrade?): the job cannot resume",
                    job.kind
                );
                self.finish(&mut job, JobState::Failed, Some(JobError::new(errors::JOB_STATE, msg))).await;
                continue;
            }
            let step = job.steps.get(job.current_step).cloned();
            match (job.state, step) {
                (JobState::InProgress, Some(s)) if s.state == StepState::Running && !s.idempotent => {
                    let msg = format!(
                        "the configuration server restarted while step {:?} was running; its outcome is unknown, so the job was not resumed: check what the step does, then run the job again",
                        s.name
                    );
                    job.steps[job.current_step].state = StepState::Failed;
                    // Before the job counts as finished: nothing can claim its machines meanwhile.
                    runner.job_ended(&job).await;
                    self.finish(&mut job, JobState::Failed, Some(JobError::new(errors::JOB_STATE, msg))).await;
                }
                _ => {
                    job.resumes += 1;
                    tracing::info!(job = %job.id, kind = %job.kind, step = job.current_step, "resuming job after restart");
                    self.spawn(runner.clone(), job);
                }
            }
        }
        Ok(())
    }

    fn spawn<R: Runner>(&self, runner: Arc<R>, job: Job) {
        let cancel = tokio_util::sync::CancellationToken::new();
        let (confirm, input) = tokio::sync::mpsc::unbounded_channel();
        self.live().insert(job.id.clone(), Live { cancel: cancel.clone(), confirm });
        let me = self.clone();
        tokio::spawn(async move { me.drive(runner, job, cancel, input).await });
    }

    async fn finish(&self, job: &mut Job, state: JobState, error: Option<JobError>) {
        job.state = state;
        job.error = error;
        job.input_prompt = None;
        job.eta_secs = None;
        job.finished_ms = Some(now_ms());
        if state == JobState::Succeeded {
            job.progress_percent = 100.0;
        }
        self.save(job).await;
        self.live().remove(&job.id);
    }

    async fn drive<R: Runner>(
        &self,
        runner: Arc<R>,
        mut job: Job,
        cancel: tokio_util::sync::CancellationToken,
        mut input: tokio::sync::mpsc::UnboundedReceiver<usize>,
    ) {
        let started = Instant::now();
        let total = job.steps.len().max(1);
        while job.current_step < job.steps.len() {
            let i = job.current_step;
            if cancel.is_cancelled() {
                job.steps[i].state = StepState::Cancelled;
                runner.job_ended(&job).await;
                self.finish(&mut job, JobState::Cancelled, None).await;
                return;
            }
            if job.steps[i].state == StepState::WaitingForInput {
                // Resumed while waiting: keep waiting.
                job.state = JobState::WaitingForInput;
            } else {
                job.state = JobState::InProgress;
                job.steps[i].state = StepState::Running;
                job.steps[i].started_ms = Some(now_ms());
                job.input_prompt = None;
                self.save(&mut job).await;
                if let Some((running, _)) = step_failpoints(&job.kind) {
                    ferry_sys::fail::fail_point(running);
                }
                let ctl = JobControl { cancel: cancel.clone(), progress: Arc::new(Mutex::new((0, 0))) };
                let snapshot = job.clone();
                let fut = runner.run_step(&snapshot, i, &ctl);
                // Report byte progress while the step runs. The reporter runs alongside the step
                // (never instead of it: a step holding a database connection must keep running
                // while a progress save waits for one — SQLite has a single connection), and it is
                // stopped between saves, never in the middle of one.
                let stop = tokio_util::sync::CancellationToken::new();
                let reporter = async {
                    let mut view = job.clone();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        let (d, t) = *ctl.progress.lock().unwrap_or_else(|p| p.into_inner());
                        if t > 0 {
                            view.bytes_done = d;
                            view.bytes_total = t;
                            let secs = started.elapsed().as_secs_f64();
                            view.eta_secs = (d > 0).then(|| secs * (t.saturating_sub(d)) as f64 / d as f64);
                            view.progress_percent = ((i as f64 + d as f64 / t as f64) / total as f64 * 100.0).min(99.9);
                            self.save(&mut view).await;
                        }
                    }
                };
                let step = async {
                    let o = fut.await;
                    stop.cancel();
                    o
                };
                let (outcome, ()) = tokio::join!(step, reporter);
                let (d, t) = *ctl.progress.lock().unwrap_or_else(|p| p.into_inner());
                if t > 0 {
                    job.bytes_done = d;
                    job.bytes_total = t;
                }
                match outcome {
                    Outcome::Done(msg) => {
                        job.steps[i].state = StepState::Done;
                        job.steps[i].message = msg;
                        job.steps[i].finished_ms = Some(now_ms());
                        job.current_step += 1;
                        job.progress_percent = job.current_step as f64 / total as f64 * 100.0;
                        let secs = started.elapsed().as_secs_f64();
                        job.eta_secs = Some(secs / job.current_step as f64 * (total - job.current_step) as f64);
                        self.save(&mut job).await;
                        if let Some((_, done)) = step_failpoints(&job.kind) {
                            ferry_sys::fail::fail_point(done);
                        }
                        continue;
                    }
                    Outcome::Failed(e) if cancel.is_cancelled() => {
                        job.steps[i].state = StepState::Cancelled;
                        job.steps[i].message = Some(e.message);
                        self.finish(&mut job, JobState::Cancelled, None).await;
                        return;
                    }
                    Outcome::Failed(e) => {
                        job.steps[i].state = StepState::Failed;
                        job.steps[i].message = Some(e.message.clone());
                        job.steps[i].finished_ms = Some(now_ms());
                        self.finish(&mut job, JobState::Failed, Some(e)).await;
                        return;
                    }
                    Outcome::WaitForInput(prompt) => {
                        job.steps[i].state = StepState::WaitingForInput;
                        job.input_prompt = Some(prompt);
                        job.state = JobState::WaitingForInput;
                    }
                }
            }
            self.save(&mut job).await;
            loop {
                tokio::select! {
                    step = input.recv() => {
                        match step {
                            None => break, // the job was dropped from the live table
                            Some(st) if st != i => continue, // a confirmation of an earlier step
                            Some(_) => {}
                        }
                        job.steps[i].state = StepState::Done;
                        job.steps[i].message = Some("confirmed by an operator".into());
                        job.steps[i].finished_ms = Some(now_ms());
                        job.input_prompt = None;
                        job.current_step += 1;
                        job.progress_percent = job.current_step as f64 / total as f64 * 100.0;
                        self.save(&mut job).await;
                        break;
                    }
                    _ = cancel.cancelled() => break,
                }
            }
        }
        self.finish(&mut job, JobState::Succeeded, None).await;
    }

    /// Confirm the manual action a job waits for. `step` (the index shown with the prompt) makes
    /// the confirmation unambiguous: a repeated or late one cannot confirm a later action.
    pub async fn confirm(&self, id: &str, step: Option<usize>) -> Result<usize, String> {
        let job: Option<Job> = self.store.job(id).await.map_err(|e| e.to_string())?;
        let Some(job) = job else { return Err(format!("no job {id}")) };
        if job.state != JobState::WaitingForInput {
            return Err(format!("job {id} is {}, not waiting for input", job.state.as_str()));
        }
        let waiting = job.current_step;
        if job.steps.get(waiting).map(|s| s.state) != Some(StepState::WaitingForInput) {
            return Err(format!("job {id} is moving to its next step: look at it again"));
        }
        if let Some(s) = step {
            if s != waiting {
                return Err(format!("step {s} of job {id} is not the one waiting for input (step {waiting} is)"));
            }
        }
        match self.live().get(id) {
            Some(l) => {
                let _ = l.confirm.send(waiting);
                Ok(waiting)
            }
            None => Err(format!("job {id} is not running on this server")),
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<(), String> {
        let job: Option<Job> = self.store.job(id).await.map_err(|e| e.to_string())?;
        let Some(job) = job else { return Err(format!("no job {id}")) };
        if job.state.finished() {
            return Err(format!("job {id} already {}", job.state.as_str()));
        }
        match self.live().get(id) {
            Some(l) => {
                l.cancel.cancel();
                Ok(())
            }
            None => Err(format!("job {id} is not running on this server")),
        }
    }
}

/// The failpoints at a job's two durability boundaries, for the kinds whose fault tests stop the
/// server exactly there: its current step recorded running (the step not yet begun), and recorded
/// done (the next one not yet begun).
fn step_failpoints(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "failover" | "failover-cancel" => {
            Some(("config-server.failover.step-running", "config-server.failover.step-done"))
        }
        "protect" => Some(("config-server.protect.step-running", "config-server.protect.step-done")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! The job engine on a real SQLite store with a stand-in runner: order, confirmation, cancel,
    //! and what a restart does with a job that was running.
    use super::*;

    /// Step behaviour by job kind: `ok` (every step done), `manual` (step 1 waits for input),
    /// `slow` (step 0 runs until cancelled).
    struct FakeRunner {
        ran: Mutex<Vec<(String, usize)>>,
        ended: Mutex<Vec<(String, JobState)>>,
    }

    impl Runner for FakeRunner {
        fn job_ended(&self, job: &Job) -> impl std::future::Future<Output = ()> + Send {
            self.ended.lock().unwrap().push((job.id.clone(), job.state));
            async {}
        }

        fn run_step(
            &self,
            job: &Job,
            step: usize,
            ctl: &JobControl,
        ) -> impl std::future::Future<Output = Outcome> + Send {
            self.ran.lock().unwrap().push((job.id.clone(), step));
            let (kind, ctl) = (job.kind.clone(), ctl.clone());
            async move {
                match (kind.as_str(), step) {
                    ("manual", 1) => Outcome::WaitForInput("press the red button".into()),
                    ("slow", 0) => {
                        ctl.bytes(1, 10);
                        ctl.cancel.cancelled().await;
                        Outcome::Failed(JobError::new(errors::JOB_STATE, "stopped"))
                    }
                    _ => Outcome::Done(Some(format!("step {step} done"))),
                }
            }
        }
    }

    async fn setup() -> (tempfile::TempDir, Jobs, Arc<FakeRunner>) {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("db.sqlite").to_str().unwrap()).await.unwrap();
        (d, Jobs::new(store), Arc::new(FakeRunner { ran: Mutex::new(Vec::new()), ended: Mutex::new(Vec::new()) }))
    }

    fn steps(n: usize, idempotent: bool) -> Vec<(String, bool)> {
        (0..n).map(|i| (format!("step {i}"), idempotent)).collect()
    }

    async fn until(jobs: &Jobs, id: &str, f: impl Fn(&Job) -> bool) -> Job {
        for _ in 0..400 {
            if let Some(j) = jobs.store.job::<Job>(id).await.unwrap() {
                if f(&j) {
                    return j;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("job {id} never reached the state the test waits for");
    }

    #[tokio::test]
    async fn steps_run_in_order_and_the_job_succeeds() {
        let (_d, jobs, r) = setup().await;
        let job = jobs.start(r.clone(), "ok", "t", steps(3, true), serde_json::json!({})).await.unwrap();
        let done = until(&jobs, &job.id, |j| j.state.finished()).await;
        assert_eq!(done.state, JobState::Succeeded);
        assert!(done.steps.iter().all(|s| s.state == StepState::Done));
        assert_eq!(done.progress_percent, 100.0);
        let ran: Vec<usize> = r.ran.lock().unwrap().iter().map(|(_, s)| *s).collect();
        assert_eq!(ran, vec![0, 1, 2]);
    }

    /// A job cancelled while it waits for input ends through the runner's `job_ended` (which
    /// gives back what its steps held); one that succeeds does not.
    #[tokio::test]
    async fn a_job_cancelled_between_steps_tells_the_runner_it_ended() {
        let (_d, jobs, r) = setup().await;
        let ok = jobs.start(r.clone(), "ok", "t", steps(2, true), serde_json::json!({})).await.unwrap();
        until(&jobs, &ok.id, |j| j.state.finished()).await;
        let job = jobs.start(r.clone(), "manual", "t", steps(3, true), serde_json::json!({})).await.unwrap();
        until(&jobs, &job.id, |j| j.state == JobState::WaitingForInput).await;
        jobs.cancel(&job.id).await.unwrap();
        let done = until(&jobs, &job.id, |j| j.state.finished()).await;
        assert_eq!(done.state, JobState::Cancelled);
        for _ in 0..200 {
            if !r.ended.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ended: Vec<String> = r.ended.lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ended, vec![job.id.clone()]);
    }

    #[tokio::test]
    async fn a_manual_step_waits_for_its_own_confirmation() {
        let (_d, jobs, r) = setup().await;
        let job = jobs.start(r.clone(), "manual", "t", steps(3, true), serde_json::json!({})).await.unwrap();
        let waiting = until(&jobs, &job.id, |j| j.state == JobState::WaitingForInput).await;
        assert_eq!(waiting.input_prompt.as_deref(), Some("press the red button"));
        assert_eq!(waiting.current_step, 1);
        let wrong = jobs.confirm(&job.id, Some(2)).await.unwrap_err();
        assert!(wrong.contains("not the one waiting"), "{wrong}");
        assert_eq!(jobs.confirm(&job.id, Some(1)).await.unwrap(), 1);
        let done = until(&jobs, &job.id, |j| j.state.finished()).await;
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.steps[1].message.as_deref(), Some("confirmed by an operator"));
        let again = jobs.confirm(&job.id, Some(1)).await.unwrap_err();
        assert!(again.contains("not waiting for input"), "{again}");
    }

    #[tokio::test]
    async fn cancel_stops_a_running_step_and_nothing_after_it_runs() {
        let (_d, jobs, r) = setup().await;
        let job = jobs.start(r.clone(), "slow", "t", steps(2, true), serde_json::json!({})).await.unwrap();
        until(&jobs, &job.id, |j| j.state == JobState::InProgress).await;
        jobs.cancel(&job.id).await.unwrap();
        let done = until(&jobs, &job.id, |j| j.state.finished()).await;
        assert_eq!(done.state, JobState::Cancelled);
        assert_eq!(done.steps[0].state, StepState::Cancelled);
        assert_eq!(done.steps[1].state, StepState::Pending);
        assert!(!r.ran.lock().unwrap().iter().any(|(_, s)| *s == 1));
        assert!(jobs.cancel(&job.id).await.unwrap_err().contains("already cancelled"));
    }

    /// A job found in progress at start: an idempotent step resumes, a non-idempotent one fails
    /// with the reason, an unknown kind fails; none stays in progress without a task.
    #[tokio::test]
    async fn a_restart_resumes_idempotent_steps_and_fails_the_others_with_a_reason() {
        let (_d, jobs, r) = setup().await;
        let interrupted = |id: &str, kind: &str, idempotent: bool| {
            let mut j = Job {
                id: id.into(),
                kind: kind.into(),
                target: "t".into(),
                state: JobState::InProgress,
                steps: steps(2, idempotent)
                    .into_iter()
                    .map(|(name, idempotent)| Step {
                        name,
                        state: StepState::Pending,
                        idempotent,
                        message: None,
                        started_ms: None,
                        finished_ms: None,
                    })
                    .collect(),
                current_step: 1,
                progress_percent: 50.0,
                bytes_done: 0,
                bytes_total: 0,
                eta_secs: None,
                error: None,
                input_prompt: None,
                params: serde_json::json!({}),
                created_ms: now_ms(),
                updated_ms: now_ms(),
                finished_ms: None,
                resumes: 0,
            };
            j.steps[0].state = StepState::Done;
            j.steps[1].state = StepState::Running;
            j
        };
        for j in [interrupted("a", "ok", true), interrupted("b", "ok", false), interrupted("c", "gone", true)] {
            jobs.store.put_job(&j.id, j.state.as_str(), &j).await.unwrap();
        }
        jobs.recover(r.clone(), &["ok"]).await.unwrap();
        let a = until(&jobs, "a", |j| j.state.finished()).await;
        assert_eq!((a.state, a.resumes), (JobState::Succeeded, 1));
        let b = until(&jobs, "b", |j| j.state.finished()).await;
        assert_eq!(b.state, JobState::Failed);
        assert!(b.error.unwrap().message.contains("restarted while step"));
        let c = until(&jobs, "c", |j| j.state.finished()).await;
        assert!(c.error.unwrap().message.contains("does not know job kind"));
        let ran = r.ran.lock().unwrap().clone();
        assert_eq!(ran, vec![("a".to_owned(), 1)], "only the idempotent step ran again, from where it was");
    }
}
