//! WGSL sources and their variants. Each kernel is `common.wgsl` (helpers) + its family's
//! interface (the row kernels' `rows.wgsl` and the family's own, e.g. `ce_io.wgsl`; or
//! `matmul_io.wgsl` for the matrix products) + its own file, run through a small preprocessor
//! (`#if A && !B || C`, `#elif`, `#else`, `#endif`, `#chunk_header` for the header every
//! family's parameters start with, and `#subgroup_args` / `#subgroup_lets` for the reduction's
//! lane builtins). Each family declares its interface WGSL, bindings and variants in its own
//! module ([`Family`], in `variant.rs` with [`Shader`] and [`Variant`]); this file only maps
//! kernels to families and files, and builds their WGSL. Every variant a
//! kernel can be built in is parsed and validated by naga in a unit test, which also checks
//! that the bindings its family declares (slot, access, name) are exactly what the shader uses.

use crate::gpu::kernels::{bce, cross_entropy, divergence, hessian, log_softmax, logprobs, matmul, row_sum};
use crate::gpu::params::HEADER_WGSL;
use crate::gpu::variant::{Binding, Family, Shader, Variant};

/// Helpers of every family (no bindings, no family parameters).
const COMMON: &str = include_str!("../../shaders/common.wgsl");

impl Shader {
    /// The family this kernel belongs to, which declares its interface.
    pub(crate) fn family(self) -> &'static Family {
        match self {
            Shader::CeWeights | Shader::CeFused | Shader::CeReduce => &cross_entropy::FAMILY,
            Shader::LogSoftmax => &log_softmax::FAMILY,
            Shader::Bce => &bce::FAMILY,
            Shader::Distill | Shader::Dist => &divergence::FAMILY,
            Shader::Hvp => &hessian::FAMILY,
            Shader::RowSum => &row_sum::FAMILY,
            Shader::Matmul | Shader::MatmulCoop => &matmul::FAMILY,
            Shader::Logprobs => &logprobs::FAMILY,
        }
    }

    /// The bindings this kernel uses in `v` (its family's list).
    pub(crate) fn bindings(self, v: Variant) -> Vec<Binding> {
        (self.family().bindings)(self, &v)
    }

    /// The variants this kernel is built in (its family's list, for the validation tests).
    #[cfg(test)]
    pub(crate) fn variants(self) -> Vec<Variant> {
        (self.family().variants)(self)
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
            Shader::RowSum => include_str!("../../shaders/row_sum.wgsl"),
            Shader::Matmul => include_str!("../../shaders/matmul.wgsl"),
            Shader::MatmulCoop => include_str!("../../shaders/matmul_coop.wgsl"),
            Shader::Logprobs => include_str!("../../shaders/logprobs.wgsl"),
        }
    }

    /// The preprocessed WGSL of this kernel in `variant`.
    pub fn source(self, variant: Variant) -> String {
        let mut out = String::new();
        if self == Shader::MatmulCoop {
            // Enable directives come before every declaration.
            out.push_str("enable f16;\nenable wgpu_cooperative_matrix;\n");
        }
        for text in std::iter::once(COMMON).chain(self.family().io.iter().copied()).chain([self.body()]) {
            preprocess(text, &|n| variant.defined(n), &mut out);
        }
        let wg = if variant.wg == 0 { 256 } else { variant.wg };
        assert!(wg.is_power_of_two() && (8..=1024).contains(&wg), "workgroup size {wg}");
        out.replace("const WG: u32 = 256u;", &format!("const WG: u32 = {wg}u;"))
    }
}

/// `A && !B || C`: OR of AND-terms of possibly negated names.
fn condition(expr: &str, defined: &dyn Fn(&str) -> bool) -> bool {
    expr.split("||").any(|term| {
        term.split("&&").all(|f| {
            let f = f.trim();
            match f.strip_prefix('!') {
                Some(name) => !defined(name.trim()),
                None => defined(f),
            }
        })
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
    // Stack of (this branch active, some branch of this #if taken) for nested blocks.
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|&(a, _)| a);
    for line in text.lines() {
        let t = line.trim();
        if t == "#chunk_header" {
            if active(&stack) {
                out.push_str(HEADER_WGSL);
            }
        } else if t == "#subgroup_args" {
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
        } else if let Some(expr) = t.strip_prefix("#elif ") {
            let top = stack.last_mut().expect("#elif without #if");
            let c = !top.1 && condition(expr, defined);
            *top = (c, top.1 || c);
        } else if t == "#else" {
            let top = stack.last_mut().expect("#else without #if");
            *top = (!top.1, true);
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
pub(crate) mod tests {
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
        let src = "#if VEC4 && GRAD\n1\n#elif GRAD\n2\n#elif VEC4 && !ODD\n3\n#else\n4\n#endif\n";
        for (v, want) in [
            (Variant { vec4: true, grad: true, ..Default::default() }, "1\n"),
            (Variant { grad: true, ..Default::default() }, "2\n"),
            (Variant { vec4: true, ..Default::default() }, "3\n"),
            (Variant::default(), "4\n"),
        ] {
            let mut out = String::new();
            preprocess(src, &|n| v.defined(n), &mut out);
            assert_eq!(out, want, "{v:?}");
        }
        let src = "fn f(\n#subgroup_args\n) {\n#subgroup_lets\n}\n";
        let mut out = String::new();
        preprocess(src, &|n| n == "SUBGROUP", &mut out);
        assert!(out.contains("@builtin(subgroup_id) sg: u32") && !out.contains("let sg"));
        let mut out = String::new();
        preprocess(src, &|_| false, &mut out);
        assert!(out.contains("let sg = 0u;") && !out.contains("@builtin"));
    }

    pub(crate) fn validate(src: &str, subgroup: bool) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
        let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
        use naga::valid::Capabilities as C;
        let mut caps = if subgroup { C::SUBGROUP } else { C::empty() };
        if src.starts_with("enable f16;") {
            // The cooperative-matrix kernel (f16 tiles).
            caps |= C::SHADER_FLOAT16 | C::COOPERATIVE_MATRIX;
        }
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all())
            .validate(&module)
            .map_err(|e| format!("{e:?}"))?;
        Ok((module, info))
    }

    /// Every variant of every family's kernels parses and validates, and uses exactly the
    /// bindings its family declares.
    #[test]
    fn every_variant_parses_and_validates() {
        let mut count = 0;
        for shader in Shader::ALL {
            let mut seen = std::collections::HashSet::new();
            for v in shader.variants() {
                let src = shader.source(v);
                if !seen.insert(src.clone()) {
                    continue; // switches this kernel ignores
                }
                count += 1;
                let (module, info) =
                    validate(&src, v.subgroup).unwrap_or_else(|e| panic!("{} {v:?}: {e}", shader.name()));
                // The declared binding list is exactly what the entry point uses, by slot,
                // access and name.
                let ep = info.get_entry_point(0);
                let mut used: Vec<(u32, bool, String)> = module
                    .global_variables
                    .iter()
                    .filter(|(h, g)| !ep[*h].is_empty() && g.binding.as_ref().is_some_and(|b| b.binding != 0))
                    .map(|(_, g)| {
                        let read_only = match g.space {
                            naga::AddressSpace::Storage { access } => !access.contains(naga::StorageAccess::STORE),
                            _ => true,
                        };
                        (g.binding.as_ref().unwrap().binding, read_only, g.name.clone().unwrap_or_default())
                    })
                    .collect();
                used.sort();
                let mut declared: Vec<(u32, bool, String)> =
                    shader.bindings(v).into_iter().map(|(s, ro, name)| (s, ro, name.to_string())).collect();
                declared.sort();
                assert_eq!(used, declared, "{} {v:?}: bindings (slot, read-only, name)", shader.name());
                assert!(declared.len() <= 8, "{} {v:?}: more than 8 storage buffers", shader.name());
            }
        }
        assert!(count > 1000, "only {count} distinct variants validated");
    }
}
