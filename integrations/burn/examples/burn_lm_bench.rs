//! A language model's output-head loss, forward + backward through Burn's autodiff on Flex
//! (Burn's CPU backend), three ways in one process on the same arrays:
//!
//! - `xent`: [`xent_burn::linear_cross_entropy`] (the `[N, V]` logits never exist);
//! - `ref`: Burn's own `Linear`-style composition `hidden @ weight^T + bias` and
//!   `CrossEntropyLoss` (as the peer program `burn_linear_ce` times it, plus the bias);
//! - `native`: xent's own `Cpu::linear_cross_entropy` on the same host arrays, outside Burn, on
//!   xent-burn's backend (`xent_burn::cpu()`).
//!
//! ```text
//! cargo run --release -p xent-burn --example burn_lm_bench -- --bench-flex 4096 512 32000 [REPS]
//!     [--dtype f32|bf16] [--bf16-grad split|rounded]
//! ```
//!
//! `--dtype bf16` makes hidden and weight bf16 for all three ways (and the bias too in Burn's
//! composition, which adds it to bf16 logits); `--bf16-grad` sets how xent's bf16 matrix kernels
//! take the f32 gradient, for both xent ways (`xent_burn::set_cpu`): `split` (f32 accuracy, the
//! default) or `rounded` (PyTorch's bf16 precision).
//!
//! Each way runs once to warm up, then `REPS` rounds (default 3) run each way once in turn, so
//! that a change in the machine's load falls on all three alike; the median step time is
//! reported. Peak memory growth of a step is measured the same way for each: the process's
//! resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the
//! resident set before the step, the largest over further rounds (min(REPS, 2), after a
//! warm-up) run once the timing is done, with glibc's allocator set to hand freed blocks back
//! to the system at once (otherwise a step could reuse what an earlier way's step freed and
//! show no growth at all; the setting slows steps, hence the separate rounds). Prints the
//! per-step times to stderr and one JSON line: `{"framework":"burn","backend":"flex","n","d","v","dtype",
//! "cpu_matmul","grad_terms" (bf16 terms of the gradient per product, null on f32 kernels),"step_s_xent",
//! "step_s_ref","step_s_native","peak_bytes_xent","peak_bytes_ref","peak_bytes_native",
//! "loss_xent","loss_ref","loss_native"}`.

#[path = "shared/lm_bench.rs"]
mod lm_bench;

fn main() {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    let precision = lm_bench::Precision::take(&mut argv);
    let usage = "usage: burn_lm_bench --bench-flex N D V [REPS] [--dtype f32|bf16] [--bf16-grad split|rounded]";
    if argv.first().map(String::as_str) != Some("--bench-flex") {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let nums: Vec<usize> = argv[1..]
        .iter()
        .map(|a| a.parse().ok().filter(|&x| x > 0).unwrap_or_else(|| panic!("not a positive number: {a}\n{usage}")))
        .collect();
    let (n, d, v, reps) = match nums[..] {
        [n, d, v] => (n, d, v, 3),
        [n, d, v, r] => (n, d, v, r),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };

    println!("{}", lm_bench::bench_flex(n, d, v, reps, &precision));
}
