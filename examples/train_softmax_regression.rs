//! Softmax regression trained on the GPU: logits and gradients never leave the device.
//!
//! Each step: logits = X W (our own matmul kernel on xent's device), xent's fused
//! cross-entropy writes d(loss)/d(logits) over the logits buffer in place, then
//! dW = X^T G and W -= lr dW. Only the scalar loss is read back.
//!
//! Run: `cargo run --release --example train_softmax_regression`

use wgpu::util::DeviceExt;
use xent::{CrossEntropy, DeviceCe, GpuContext, GradMode};

const N: usize = 2048; // samples
const D: usize = 32; // features
const C: usize = 10; // classes

const KERNELS: &str = r#"
struct Dims { n: u32, d: u32, c: u32, lr: f32 }
@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // [n, d]
@group(0) @binding(2) var<storage, read_write> w: array<f32>;  // [d, c]
@group(0) @binding(3) var<storage, read_write> z: array<f32>;  // [n, c]: logits, then gradient

// z = x w
@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.n * dims.c) { return; }
    let r = i / dims.c;
    let k = i % dims.c;
    var acc = 0.0;
    for (var j = 0u; j < dims.d; j++) { acc += x[r * dims.d + j] * w[j * dims.c + k]; }
    z[i] = acc;
}

// w -= lr * x^T z   (z holds the gradient of the mean loss w.r.t. the logits)
@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.d * dims.c) { return; }
    let j = i / dims.c;
    let k = i % dims.c;
    var acc = 0.0;
    for (var r = 0u; r < dims.n; r++) { acc += x[r * dims.d + j] * z[r * dims.c + k]; }
    w[i] -= dims.lr * acc;
}
"#;

fn main() {
    let ctx = match GpuContext::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return;
        }
    };
    println!("device: {}", ctx.adapter_name());
    let dev = ctx.device();

    // A separable problem: labels come from a hidden linear model.
    let (x, _) = xent::workload::synthetic(N, D, 1.0, 0, 1);
    let (w_true, _) = xent::workload::synthetic(D, C, 1.0, 0, 2);
    let scores = x.dot(&w_true);
    let labels: Vec<i32> = scores
        .rows()
        .into_iter()
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as i32)
        .collect();

    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |label, contents: &[u8], usage| {
        dev.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage })
    };
    let xb = init("x", bytemuck::cast_slice(x.as_slice().unwrap()), storage);
    let wb = init("w", &vec![0u8; D * C * 4], storage);
    let zb = init("logits", &vec![0u8; N * C * 4], storage);
    let tb = init("targets", bytemuck::cast_slice(&labels), storage);
    let dims: [u32; 4] = [N as u32, D as u32, C as u32, 0.5f32.to_bits()];
    let ub = init("dims", bytemuck::cast_slice(&dims), wgpu::BufferUsages::UNIFORM);

    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("softmax regression"),
        source: wgpu::ShaderSource::Wgsl(KERNELS.into()),
    });
    let pipeline = |entry| {
        dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let (forward, update) = (pipeline("forward"), pipeline("update"));
    let group = |p: &wgpu::ComputePipeline| {
        let entries: Vec<_> = [&ub, &xb, &wb, &zb]
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .collect();
        dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.get_bind_group_layout(0),
            entries: &entries,
        })
    };
    let (gf, gu) = (group(&forward), group(&update));
    let run = |p: &wgpu::ComputePipeline, g: &wgpu::BindGroup, threads: usize| {
        let mut enc = dev.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(p);
            pass.set_bind_group(0, g, &[]);
            pass.dispatch_workgroups(threads.div_ceil(64) as u32, 1, 1);
        }
        ctx.queue().submit([enc.finish()]);
    };

    // Gradient of the mean loss, written over the logits buffer.
    let cfg = CrossEntropy { grad: GradMode::InPlace, per_row: false, ..Default::default() };
    let job = DeviceCe { logits: &zb, targets: &tb, rows: N, classes: C, grad: None };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..=150 {
        run(&forward, &gf, N * C);
        let out = ctx.cross_entropy_device(job, &cfg).expect("cross-entropy");
        first.get_or_insert(out.loss);
        last = out.loss;
        if step % 25 == 0 {
            println!("step {step:3}: loss {:.4}", out.loss);
        }
        run(&update, &gu, D * C);
    }
    let start = first.unwrap();
    println!("loss {start:.4} -> {last:.4} (ln {C} = {:.4})", (C as f64).ln());
    assert!(last < 0.5 * start, "training should at least halve the loss");
}
