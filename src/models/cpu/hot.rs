//! Runs a forward step inside rayon's pool with the pool's other threads kept looking for work.
//!
//! A step is a few hundred short parallel regions with serial work between them. rayon puts a
//! worker that finds nothing for a few dozen rounds to sleep on a futex, and the next region
//! wakes it: on two cores under a hypervisor the wake-ups and context switches took about a
//! tenth of a 16-stream decode step (`perf record` of `llorch bench --concurrency 16`). For the
//! length of a step, each other worker runs a job that asks the pool for work in a loop and so
//! never sleeps; the loop ends as soon as the step does, or after [`IDLE`] without work. One
//! step in the process at a time has the threads hot ([`HOT`]); another runs as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether some step in the process has the pool's threads hot. One at a time: a thread picks
/// up a step's loop whenever it looks for work, also while it waits inside another job, and
/// that job then waits for the step; two hot steps (two models on the CPU) could each wait for
/// the other's loop to end (seen in `tests/batching.rs`, its engines sharing the pool).
static HOT: AtomicBool = AtomicBool::new(false);

/// How long a loop looks for work that does not come before it gives its thread back to
/// rayon's own idling: far longer than the gaps between a step's parallel regions, and the
/// bound on a stall if a loop was picked up inside a job of its own step (a thread that
/// searched for work just before the step began and stole one of its first jobs).
const IDLE: Duration = Duration::from_millis(1);

/// Runs `step` on a thread of rayon's pool (so that its parallel regions split from inside the
/// pool) with the pool's other threads kept hot until it returns, unless another step has them.
pub fn run<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    run_hot(step).0
}

/// [`run`], and whether the step had the threads hot.
fn run_hot<R: Send>(step: impl FnOnce() -> R + Send) -> (R, bool) {
    rayon::scope(|_| {
        let hot = Hot::start();
        (step(), hot.done.is_some())
    })
}

/// While alive (and holding [`HOT`]), every other worker of the current rayon pool steals work
/// without sleeping.
struct Hot {
    done: Option<Arc<AtomicBool>>,
}

impl Hot {
    /// Starts the loop on every worker of the current pool but this thread, if no other step
    /// holds [`HOT`]. In a pool of one thread nothing spins.
    fn start() -> Hot {
        let me = rayon::current_thread_index();
        if me.is_none() || rayon::current_num_threads() < 2 || HOT.swap(true, Ordering::Acquire) {
            return Hot { done: None };
        }
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        rayon::spawn_broadcast(move |context| {
            // This thread's own copy must return: run while it waits inside the step, a
            // loop here would keep the step from ever finishing.
            if Some(context.index()) == me {
                return;
            }
            let mut idle_since = None;
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(Instant::now).elapsed() > IDLE {
                    return;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        Hot { done: Some(done) }
    }
}

impl Drop for Hot {
    fn drop(&mut self) {
        if let Some(done) = &self.done {
            done.store(true, Ordering::Release);
            HOT.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::hint::black_box;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A step with hot workers finishes, even when this thread meets its own copy of the loop
    /// first, and the other workers stop looping once it has: the pool's threads can exit.
    #[test]
    fn a_step_keeps_the_workers_hot_and_lets_them_go_after() {
        let (exits, exited) = mpsc::channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .exit_handler(move |index| exits.send(index).unwrap())
            .build()
            .unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            // Another test's step may hold the threads of its own pool hot: try again.
            let sum = loop {
                let (sum, hot) = pool.install(|| {
                    run_hot(|| {
                        // This thread's own copy of the loop is the first job it finds.
                        while rayon::yield_local() == Some(rayon::Yield::Executed) {}
                        (0..100_000u64).into_par_iter().sum::<u64>()
                    })
                });
                if hot {
                    break sum;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            sender.send(sum).unwrap();
        });
        let limit = Duration::from_secs(60);
        let sum = receiver.recv_timeout(limit).expect("the step finishes");
        assert_eq!(sum, 99_999 * 100_000 / 2);
        let mut gone: Vec<usize> = (0..3)
            .map(|_| exited.recv_timeout(limit).expect("every worker exits"))
            .collect();
        gone.sort_unstable();
        assert_eq!(gone, [0, 1, 2]);
    }

    /// Steps of several engines at once on one pool, each with nested parallel work, all
    /// finish: two steps never hold each other's threads.
    #[test]
    fn steps_of_several_engines_on_one_pool_all_finish() {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap(),
        );
        let (sender, receiver) = mpsc::channel();
        for engine in 0..4u64 {
            let (pool, sender) = (Arc::clone(&pool), sender.clone());
            std::thread::spawn(move || {
                let mut total = 0;
                for _ in 0..50 {
                    // A step: layers of parallel regions with serial work between them.
                    total += pool.install(|| {
                        run(|| {
                            (0..30u64)
                                .map(|layer| {
                                    (0..64u64)
                                        .into_par_iter()
                                        .map(|i| {
                                            (0..500 + i + layer + engine)
                                                .map(black_box)
                                                .sum::<u64>()
                                        })
                                        .sum::<u64>()
                                })
                                .sum::<u64>()
                        })
                    });
                }
                sender.send(total).unwrap();
            });
        }
        for _ in 0..4 {
            receiver
                .recv_timeout(Duration::from_secs(120))
                .expect("every engine's steps finish");
        }
    }
}
