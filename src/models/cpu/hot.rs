//! Runs a forward step inside rayon's pool with the pool's other threads kept looking for work.
//!
//! A step is a few hundred short parallel regions with serial work between them. rayon puts a
//! worker that finds nothing for a few dozen rounds to sleep on a futex, and the next region
//! wakes it: on two cores under a hypervisor the wake-ups and context switches took about a
//! tenth of a 16-stream decode step (`perf record` of `llorch bench --concurrency 16`). For the
//! length of a step, each other worker runs a job that asks the pool for work in a loop and so
//! never sleeps; the loop ends as soon as the step does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Runs `step` on a thread of rayon's pool (so that its parallel regions split from inside the
/// pool) with the pool's other threads kept hot until it returns.
pub fn run<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| {
        let _hot = Hot::start();
        step()
    })
}

/// While alive, every other worker of the current rayon pool steals work without sleeping.
struct Hot {
    done: Arc<AtomicBool>,
}

impl Hot {
    /// Starts the loop on every worker of the current pool but this thread. In a pool of one
    /// thread nothing spins.
    fn start() -> Hot {
        let done = Arc::new(AtomicBool::new(false));
        let me = rayon::current_thread_index();
        if me.is_some() && rayon::current_num_threads() > 1 {
            let flag = Arc::clone(&done);
            rayon::spawn_broadcast(move |context| {
                // This thread's own copy must return: run while it waits inside the step, a
                // loop here would keep the step from ever finishing.
                if Some(context.index()) == me {
                    return;
                }
                while !flag.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        Hot { done }
    }
}

impl Drop for Hot {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
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
            let sum = pool.install(|| {
                run(|| {
                    // This thread's own copy of the loop is the first job it finds.
                    while rayon::yield_local() == Some(rayon::Yield::Executed) {}
                    (0..100_000u64).into_par_iter().sum::<u64>()
                })
            });
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
}
