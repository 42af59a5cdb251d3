//! Linear cross-entropy, forward + backward through Candle's autograd on the CPU, three ways in
//! one process on the same arrays:
//!
//! - `xent`: [`xent_candle::linear_cross_entropy`] of `Var`s hidden `[N, D]` and weight `[V, D]`,
//!   `loss.backward()`, both gradients read from the grad store;
//! - `ref`: Candle's own composition, `hidden.matmul(&weight.t())` + `candle_nn::loss::cross_entropy`,
//!   the same backward;
//! - `native`: xent's own `Cpu::linear_cross_entropy` on ndarray copies of the same values
//!   (no framework), on xent-candle's backend (`xent_candle::cpu()`).
//!
//! One warm-up step of each, then `--reps` rounds (default 3), each timing one step of each way
//! in turn; the medians are reported. Memory per step is measured the same way for all three:
//! `peak_bytes_*` is the growth of the bytes live on the heap (a counting global allocator:
//! peak during the step minus the bytes live when it starts), `rss_bytes_*` the growth of the
//! process's peak RSS (`/proc/self/clear_refs` + `VmHWM`, as the rust-peers programs measure).
//!
//! `cargo run --release -p xent-candle --example candle_linear_bench [-- --bench N D V] [--reps R]
//! [--dtype f32|f16|bf16] [--bf16-grad split|rounded]` (hidden and weight in that dtype for all
//! three, default f32; how xent's bf16 matrix kernels take the gradient, for both xent ways,
//! through `xent_candle::set_cpu`: `split` (f32 accuracy, the default) or `rounded` (PyTorch's))
//!
//! The last line is one JSON object: `framework`, `backend`, `n`, `d`, `v`, `dtype`, `cpu_matmul`
//! (xent's matrix kernels), `grad_terms` (bf16 terms of the gradient per product, `null` on f32
//! kernels), `step_s_xent`, `step_s_ref`, `step_s_native`, `peak_bytes_xent`, `peak_bytes_ref`,
//! `peak_bytes_native`, `rss_bytes_xent`, `rss_bytes_ref`, `rss_bytes_native`, `loss_xent`,
//! `loss_ref`, `loss_native`, `max_grad_diff` (largest difference between the xent and ref
//! gradients over the largest gradient entry).

#[path = "common/bench.rs"]
mod bench;

fn main() -> candle_core::Result<()> {
    bench::run(&std::env::args().collect::<Vec<_>>())
}
