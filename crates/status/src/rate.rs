use std::time::Instant;

/// Exponentially smoothed bytes-per-second meter.
#[derive(Debug)]
pub struct RateMeter {
    last: Instant,
    pending: u64,
    rate: f64,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter { last: Instant::now(), pending: 0, rate: 0.0 }
    }
}

impl RateMeter {
    pub fn add(&mut self, bytes: u64) {
        self.pending += bytes;
        self.roll();
    }

    fn roll(&mut self) {
        let dt = self.last.elapsed().as_secs_f64();
        if dt >= 0.5 {
            let inst = self.pending as f64 / dt;
            // Decay toward zero when idle for long, so an idle link reads ~0.
            let alpha = (dt / 2.0).min(1.0);
            self.rate = self.rate * (1.0 - alpha) + inst * alpha;
            self.pending = 0;
            self.last = Instant::now();
        }
    }

    pub fn bytes_per_sec(&mut self) -> f64 {
        self.roll();
        self.rate
    }
}
