use super::*;
use proptest::prelude::*;

fn config(blocks: usize, max_seqs: usize, max_batch_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_seqs,
        max_batch_tokens,
        block_size: 4,
        blocks,
        prefix_caching: true,
        prompts_alone: false,
    }
}

/// Runs a plan as the engine would: commits it and appends a token to every sequence whose
/// chunk gave logits (token `100 + seq`).
fn run(s: &mut Scheduler, plan: &Plan) {
    s.commit(plan);
    for chunk in plan.chunks.iter().filter(|c| c.logits) {
        s.push_token(chunk.seq, 100 + chunk.seq as u32);
    }
    s.check();
}

fn chunk(seq: SeqId, start: usize, len: usize, logits: bool) -> Chunk {
    Chunk {
        seq,
        start,
        len,
        logits,
    }
}

#[test]
fn prompts_are_chunked_to_the_budget_and_decodes_go_first() {
    let mut s = Scheduler::new(config(64, 4, 8));
    s.add(1, vec![7; 5], 0, true);
    s.add(2, vec![8; 10], 0, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(1, 0, 5, true), chunk(2, 0, 3, false)]);
    assert_eq!(plan.admitted, [1, 2]);
    run(&mut s, &plan);
    // Sequence 1 decodes first, then the rest of 2's prompt fills the budget.
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(1, 5, 1, true), chunk(2, 3, 7, true)]);
    assert!(plan.admitted.is_empty());
    run(&mut s, &plan);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(1, 6, 1, true), chunk(2, 10, 1, true)]);
}

#[test]
fn prompts_alone_gives_a_finishing_prompt_a_step_without_decodes_then_alternates() {
    let mut s = Scheduler::new(SchedulerConfig {
        prompts_alone: true,
        ..config(64, 4, 8)
    });
    s.add(1, vec![7; 3], 0, true);
    let plan = s.schedule();
    assert_eq!(
        plan.chunks,
        [chunk(1, 0, 3, true)],
        "no decodes yet: one step"
    );
    run(&mut s, &plan);
    // 2 arrives while 1 decodes: its prompt runs alone, 1's decode waits one step.
    s.add(2, vec![8; 4], 0, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(2, 0, 4, true)]);
    run(&mut s, &plan);
    // 3 arrives at once: never two such steps in a row, so it shares the decodes' step.
    s.add(3, vec![9; 2], 0, true);
    let plan = s.schedule();
    assert_eq!(
        plan.chunks,
        [
            chunk(1, 3, 1, true),
            chunk(2, 4, 1, true),
            chunk(3, 0, 2, true)
        ]
    );
    run(&mut s, &plan);
    // A prompt that does not finish in this step rides along with the decodes.
    s.add(4, vec![5; 12], 0, true);
    let plan = s.schedule();
    assert_eq!(
        plan.chunks,
        [
            chunk(1, 4, 1, true),
            chunk(2, 5, 1, true),
            chunk(3, 2, 1, true),
            chunk(4, 0, 5, false)
        ]
    );
    run(&mut s, &plan);
    let plan = s.schedule();
    assert_eq!(plan.chunks[3], chunk(4, 5, 5, false));
    run(&mut s, &plan);
    // Its last chunk finishes it: that step runs alone.
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(4, 10, 2, true)]);
}

#[test]
fn the_queue_is_served_in_order_up_to_max_seqs() {
    let mut s = Scheduler::new(config(64, 2, 64));
    for id in 1..=3 {
        s.add(id, vec![1, 2, 3], 0, true);
    }
    let plan = s.schedule();
    assert_eq!(plan.admitted, [1, 2]);
    assert_eq!((s.running(), s.waiting()), (2, 1));
    run(&mut s, &plan);
    s.remove(1);
    let plan = s.schedule();
    assert_eq!(plan.admitted, [3]);
    s.check();
}

#[test]
fn a_full_pool_preempts_the_newest_which_resumes_with_all_its_tokens() {
    // 4 blocks of 4 slots.
    let mut s = Scheduler::new(SchedulerConfig {
        prefix_caching: false,
        ..config(4, 4, 64)
    });
    s.add(1, (0..6).collect(), 0, true);
    s.add(2, (10..13).collect(), 0, true);
    let plan = s.schedule();
    assert_eq!(plan.admitted, [1, 2]);
    run(&mut s, &plan);
    // 1 holds 2 blocks, 2 holds 1; the next step fills both, the one after gives 2 its
    // second block, and then 1 needs a third: the newest (2) is preempted.
    for _ in 0..2 {
        let plan = s.schedule();
        assert!(plan.preempted.is_empty());
        run(&mut s, &plan);
    }
    let plan = s.schedule();
    assert_eq!(plan.preempted, [2]);
    assert_eq!(plan.chunks, [chunk(1, 8, 1, true)]);
    assert_eq!(s.counters().preemptions, 1);
    run(&mut s, &plan);
    // 2 has 6 known tokens: it comes back once 2 blocks (all its tokens and one more) are
    // free, and computes them all again.
    assert_eq!(s.tokens(2).len(), 6);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(1, 9, 1, true)], "1 block free: 2 waits");
    run(&mut s, &plan);
    s.remove(1);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(2, 0, 6, true)]);
    assert!(plan.admitted.is_empty(), "2 was admitted before");
    assert_eq!(s.counters().recomputed_tokens, 6);
    run(&mut s, &plan);
}

#[test]
fn a_paused_sequence_is_skipped_and_preempted_first() {
    let mut s = Scheduler::new(SchedulerConfig {
        prefix_caching: false,
        ..config(4, 4, 64)
    });
    s.add(1, (0..3).collect(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    s.add(2, (10..13).collect(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    s.set_paused(1, true);
    assert_eq!(s.paused(), 1);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(2, 3, 1, true)]);
    run(&mut s, &plan);
    // 2 grows until it needs the block 1 holds: 1, though older, is the victim.
    let mut preempted = Vec::new();
    for _ in 0..20 {
        let plan = s.schedule();
        run(&mut s, &plan);
        if !plan.preempted.is_empty() {
            preempted = plan.preempted;
            break;
        }
    }
    assert_eq!(preempted, [1]);
    assert_eq!((s.running(), s.waiting()), (1, 1));
}

#[test]
fn a_repeated_prompt_reuses_its_full_blocks_but_never_its_last_token() {
    let mut s = Scheduler::new(config(16, 4, 64));
    let prompt: Vec<u32> = (0..10).collect();
    s.add(1, prompt.clone(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    s.remove(1);
    assert_eq!(s.blocks_cached(), 2);
    // The same prompt: blocks 0..8 are reused, 8..10 computed.
    s.add(2, prompt.clone(), 0, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(2, 8, 2, true)]);
    assert_eq!(s.cached_tokens(2), 8);
    run(&mut s, &plan);
    s.remove(2);
    // Exactly 8 tokens: the last block must be computed for its logits, so 4 are reused.
    s.add(3, prompt[..8].to_vec(), 0, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(3, 4, 4, true)]);
    run(&mut s, &plan);
    s.remove(3);
    // Another salt (another caller) shares nothing.
    s.add(4, prompt.clone(), 1, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(4, 0, 10, true)]);
    run(&mut s, &plan);
    s.remove(4);
    // A sequence that may not reuse (an echo with log probabilities) computes it all.
    s.add(5, prompt.clone(), 0, false);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(5, 0, 10, true)]);
    assert_eq!(s.cached_tokens(5), 0);
    let counters = s.counters();
    assert_eq!(counters.prefix_hit_tokens, 12);
    assert_eq!(counters.prefix_queried_tokens, 48);
    s.check();
}

#[test]
fn generated_tokens_fill_blocks_that_the_next_turn_reuses() {
    let mut s = Scheduler::new(config(16, 4, 64));
    s.add(1, vec![5, 6, 7], 0, true);
    for _ in 0..6 {
        let plan = s.schedule();
        run(&mut s, &plan);
    }
    let turn: Vec<u32> = s.tokens(1).to_vec();
    assert_eq!(turn.len(), 9);
    s.remove(1);
    let mut next = turn.clone();
    next.extend([40, 41]);
    s.add(2, next, 0, true);
    let plan = s.schedule();
    assert_eq!(plan.chunks, [chunk(2, 8, 3, true)]);
}

#[test]
fn cached_blocks_are_evicted_least_recently_freed_first() {
    let mut s = Scheduler::new(config(4, 4, 64));
    s.add(1, (0..5).collect(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    s.remove(1);
    s.add(2, (10..15).collect(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    s.remove(2);
    assert_eq!(s.blocks_cached(), 2);
    // Four blocks' worth of new tokens: every cached block is reused for new contents.
    s.add(3, (20..35).collect(), 0, true);
    let plan = s.schedule();
    run(&mut s, &plan);
    assert_eq!(s.counters().evictions, 2);
    s.remove(3);
    s.add(4, (0..5).collect(), 0, true);
    let plan = s.schedule();
    assert_eq!(
        plan.chunks,
        [chunk(4, 0, 5, true)],
        "evicted, so computed again"
    );
}

/// One random action on the scheduler.
#[derive(Debug, Clone)]
enum Action {
    Add { prompt: Vec<u32>, salt: u64 },
    Step,
    Remove(usize),
    Pause(usize, bool),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (proptest::collection::vec(0u32..6, 1..30), 0u64..2)
            .prop_map(|(prompt, salt)| Action::Add { prompt, salt }),
        Just(Action::Step),
        Just(Action::Step),
        Just(Action::Step),
        (0usize..8).prop_map(Action::Remove),
        (0usize..8, any::<bool>()).prop_map(|(i, p)| Action::Pause(i, p)),
    ]
}

proptest! {
    /// Under random arrivals, steps, removals and pauses the bookkeeping holds after every
    /// action, a sequence's blocks always cover what is computed, and at the end every block
    /// is free again.
    #[test]
    fn the_bookkeeping_holds_under_random_traffic(
        actions in proptest::collection::vec(action(), 1..120),
        blocks in 8usize..24,
        prompts_alone in any::<bool>(),
    ) {
        let mut s = Scheduler::new(SchedulerConfig { prompts_alone, ..config(blocks, 4, 12) });
        let mut next = 0;
        for action in actions {
            match action {
                Action::Add { prompt, salt } => {
                    if prompt.len() < s.capacity() / 2 {
                        next += 1;
                        s.add(next, prompt, salt, true);
                    }
                }
                Action::Step => {
                    let plan = s.schedule();
                    for c in &plan.chunks {
                        prop_assert!(s.block_table(c.seq).len() * 4 >= c.start + c.len);
                        prop_assert!(c.start + c.len <= s.tokens(c.seq).len());
                    }
                    let total: usize = plan.chunks.iter().map(|c| c.len).sum();
                    prop_assert!(total <= 12);
                    run(&mut s, &plan);
                    // Sequences end when they reach a third of the pool.
                    for id in s.ids() {
                        if s.tokens(id).len() >= s.capacity() / 2 {
                            s.remove(id);
                        }
                    }
                }
                Action::Remove(i) => {
                    if let Some(&id) = s.ids().get(i) {
                        s.remove(id);
                    }
                }
                Action::Pause(i, paused) => {
                    if let Some(&id) = s.ids().get(i) {
                        s.set_paused(id, paused);
                    }
                }
            }
            s.check();
        }
        for id in s.ids() {
            s.remove(id);
        }
        s.check();
        prop_assert_eq!(s.blocks_used(), 0);
    }
}
