//! WGSL sources and their variants. Each kernel is `common.wgsl` + its own file, run through a
//! tiny preprocessor (`#if A`, `#if !A`, `#if A || B`, `#else`, `#endif`).

/// Compile-time variant switches of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Variant {
    /// Rows are read as `vec4<f32>` (V divisible by 4).
    pub vec4: bool,
    /// Reductions use subgroup operations.
    pub subgroup: bool,
    /// A separate output buffer is written (gradient or log-softmax output).
    pub grad: bool,
    /// The gradient overwrites the logits.
    pub in_place: bool,
    /// Per-element extras of the softmax pass: label smoothing or class-weighted sums,
    /// probability targets, target ranks. Off, the pass is max/sum only.
    pub extras: bool,
}

impl Variant {
    fn defined(&self, name: &str) -> bool {
        match name {
            "VEC4" => self.vec4,
            "SUBGROUP" => self.subgroup,
            "GRAD" => self.grad,
            "IN_PLACE" => self.in_place,
            "EXTRAS" => self.extras,
            other => panic!("unknown shader define {other}"),
        }
    }
}

/// The kernels xent ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shader {
    /// Target check and weight sum (one workgroup).
    CeWeights,
    /// Per-row statistic, loss and gradient.
    CeFused,
    /// Sum of per-row losses (one workgroup).
    CeReduce,
    /// Row-wise log-softmax / softmax.
    LogSoftmax,
    /// Elementwise binary cross-entropy with partial sums.
    Bce,
    /// Distillation divergences between student and teacher rows.
    Distill,
    /// Entropy, cross-entropy, KL and JS of row pairs.
    Dist,
    /// Hessian-vector products.
    Hvp,
}

const COMMON: &str = include_str!("../../shaders/common.wgsl");

impl Shader {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shader::CeWeights => "ce_weights",
            Shader::CeFused => "ce_fused",
            Shader::CeReduce => "ce_reduce",
            Shader::LogSoftmax => "log_softmax",
            Shader::Bce => "bce",
            Shader::Distill => "distill",
            Shader::Dist => "dist",
            Shader::Hvp => "hvp",
        }
    }

    /// Whether the kernel has a `vec4` variant (the row-wise softmax kernels do; the
    /// elementwise and row-pair kernels read scalars).
    /// The bindings this kernel variant uses, as (slot, read-only), the uniform slot 0 aside.
    /// Kept to at most 8 storage buffers, WebGPU's default per-stage limit, so that xent runs
    /// on devices created with default limits. A unit test checks each list against naga's
    /// analysis of what the shader statically uses.
    pub(crate) fn bindings(self, v: Variant) -> Vec<(u32, bool)> {
        let mut b = match self {
            Shader::CeWeights => vec![(2, true), (3, true), (4, true), (5, false)],
            Shader::CeFused => vec![(1, !v.in_place), (2, true), (3, true), (4, true), (6, false)],
            Shader::CeReduce => vec![(2, true), (5, false), (6, false)],
            Shader::LogSoftmax => vec![(1, true), (8, false)],
            Shader::Bce => vec![(1, true), (3, true), (4, true), (9, true), (10, true), (6, false), (7, false)],
            Shader::Distill => vec![(1, true), (9, true), (6, false)],
            Shader::Dist => vec![(1, true), (9, true), (8, false)],
            Shader::Hvp => vec![(1, true), (9, true), (8, false)],
        };
        if v.grad && matches!(self, Shader::CeFused | Shader::Bce | Shader::Distill) {
            b.push((8, false));
        }
        if v.extras && matches!(self, Shader::CeFused | Shader::LogSoftmax) {
            // Probability targets (Y) and class weights of the smoothing sums.
            b.push((9, true));
            if self == Shader::LogSoftmax {
                b.push((3, true));
            }
        }
        if (v.grad || v.in_place) && self == Shader::CeFused {
            // The gradient's mean coefficient comes from the scalars of the weights pass.
            b.push((5, false));
        }
        b
    }

    #[cfg(test)]
    pub(crate) fn has_vec4(self) -> bool {
        !matches!(self, Shader::Bce | Shader::Distill | Shader::Dist | Shader::Hvp)
    }

    fn body(self) -> &'static str {
        match self {
            Shader::CeWeights => include_str!("../../shaders/ce_weights.wgsl"),
            Shader::CeFused => include_str!("../../shaders/ce_fused.wgsl"),
            Shader::CeReduce => include_str!("../../shaders/ce_reduce.wgsl"),
            Shader::LogSoftmax => include_str!("../../shaders/log_softmax.wgsl"),
            Shader::Bce => include_str!("../../shaders/bce.wgsl"),
            Shader::Distill => include_str!("../../shaders/distill.wgsl"),
            Shader::Dist => include_str!("../../shaders/dist.wgsl"),
            Shader::Hvp => include_str!("../../shaders/hvp.wgsl"),
        }
    }

    /// The preprocessed WGSL of this kernel in `variant`.
    pub fn source(self, variant: Variant) -> String {
        let mut out = String::new();
        for text in [COMMON, self.body()] {
            preprocess(text, &|n| variant.defined(n), &mut out);
        }
        out
    }
}

fn condition(expr: &str, defined: &dyn Fn(&str) -> bool) -> bool {
    expr.split("||").any(|term| {
        let term = term.trim();
        match term.strip_prefix('!') {
            Some(name) => !defined(name.trim()),
            None => defined(term),
        }
    })
}

/// Entry-point parameters that locate an invocation in its subgroup (`#subgroup_args`), and
/// their stand-ins for the workgroup-memory variant (`#subgroup_lets`): every reduction takes
/// (lane, sg, nsg) either way.
const SUBGROUP_ARGS: &str = "    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
";
const SUBGROUP_LETS: &str = "    let lane = 0u;
    let sg = 0u;
    let nsg = 1u;
";

fn preprocess(text: &str, defined: &dyn Fn(&str) -> bool, out: &mut String) {
    // Stack of (this branch active, some branch taken) for nested #if blocks.
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|&(a, _)| a);
    for line in text.lines() {
        let t = line.trim();
        if t == "#subgroup_args" {
            if active(&stack) && defined("SUBGROUP") {
                out.push_str(SUBGROUP_ARGS);
            }
        } else if t == "#subgroup_lets" {
            if active(&stack) && !defined("SUBGROUP") {
                out.push_str(SUBGROUP_LETS);
            }
        } else if let Some(expr) = t.strip_prefix("#if ") {
            let c = condition(expr, defined);
            stack.push((c, c));
        } else if t == "#else" {
            let top = stack.last_mut().expect("#else without #if");
            top.0 = !top.1;
        } else if t == "#endif" {
            stack.pop().expect("#endif without #if");
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(stack.is_empty(), "unterminated #if");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessor_selects_branches() {
        let src = "a\n#if VEC4\nb\n#if !SUBGROUP\nc\n#endif\n#else\nd\n#endif\n#if GRAD || IN_PLACE\ne\n#endif\n";
        let mut out = String::new();
        let v = Variant { vec4: true, ..Default::default() };
        preprocess(src, &|n| v.defined(n), &mut out);
        assert_eq!(out, "a\nb\nc\n");
        let mut out = String::new();
        let v = Variant { in_place: true, subgroup: true, ..Default::default() };
        preprocess(src, &|n| v.defined(n), &mut out);
        assert_eq!(out, "a\nd\ne\n");
        let src = "fn f(\n#subgroup_args\n) {\n#subgroup_lets\n}\n";
        let mut out = String::new();
        preprocess(src, &|n| n == "SUBGROUP", &mut out);
        assert!(out.contains("@builtin(subgroup_id) sg: u32") && !out.contains("let sg"));
        let mut out = String::new();
        preprocess(src, &|_| false, &mut out);
        assert!(out.contains("let sg = 0u;") && !out.contains("@builtin"));
    }

    #[test]
    fn every_variant_parses_and_validates() {
        for shader in [
            Shader::CeWeights,
            Shader::CeFused,
            Shader::CeReduce,
            Shader::LogSoftmax,
            Shader::Bce,
            Shader::Distill,
            Shader::Dist,
            Shader::Hvp,
        ] {
            for bits in 0..32u32 {
                let v = Variant {
                    vec4: bits & 1 != 0,
                    subgroup: bits & 2 != 0,
                    grad: bits & 4 != 0,
                    in_place: bits & 8 != 0,
                    extras: bits & 16 != 0,
                };
                if v.grad && v.in_place || v.vec4 && !shader.has_vec4() {
                    continue;
                }
                let src = shader.source(v);
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{} {v:?}: {}", shader.name(), e.emit_to_string(&src)));
                let caps =
                    if v.subgroup { naga::valid::Capabilities::SUBGROUP } else { naga::valid::Capabilities::empty() };
                let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                    .subgroup_operations(naga::valid::SubgroupOperationSet::all())
                    .validate(&module)
                    .unwrap_or_else(|e| panic!("{} {v:?}: {e:?}", shader.name()));
                // The declared binding list is exactly what the entry point uses.
                let ep = info.get_entry_point(0);
                let mut used: Vec<u32> = module
                    .global_variables
                    .iter()
                    .filter(|(h, g)| !ep[*h].is_empty() && g.binding.is_some())
                    .map(|(_, g)| g.binding.as_ref().unwrap().binding)
                    .filter(|&b| b != 0)
                    .collect();
                used.sort();
                let mut declared: Vec<u32> = shader.bindings(v).iter().map(|b| b.0).collect();
                declared.sort();
                assert_eq!(used, declared, "{} {v:?}: bindings", shader.name());
                assert!(declared.len() <= 8, "{} {v:?}: more than 8 storage buffers", shader.name());
            }
        }
    }
}
