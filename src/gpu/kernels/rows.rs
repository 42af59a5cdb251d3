//! The row kernels' shared interface (`shaders/rows.wgsl`): the row tensors every row family
//! may bind (input rows, per-row values, output rows, second rows), the switches of
//! [`Variant`] that describe them, and, for the tests, the enumeration of those switches that
//! each row family filters to the variants it builds. A family's own slots (targets, weights,
//! scalars, ...) are declared in its own WGSL and module, not here.

use crate::gpu::variant::{Binding, Variant};

/// The WGSL every row family includes before its own interface.
pub(crate) const WGSL: &str = include_str!("../../../shaders/rows.wgsl");

/// The input rows (slot 1), written in place when `v.in_place`.
pub(crate) fn input(v: &Variant) -> Binding {
    (1, !v.in_place, "input")
}

/// f32 values per row, or a kernel's partial sums (slot 6).
pub(crate) const ROW_VALUES: Binding = (6, false, "row_values");

/// The second rows (slot 9: probability targets, teacher logits, `p`, `v`, BCE targets).
pub(crate) const SECOND: Binding = (9, true, "second");

/// The output rows (slot 8), bound in a variant that writes them (`grad`).
pub(crate) fn output(v: &Variant) -> Option<Binding> {
    v.grad.then_some((8, false, "output"))
}

/// `list`, then the output rows where `v` writes them.
pub(crate) fn with_output(v: &Variant, mut list: Vec<Binding>) -> Vec<Binding> {
    list.extend(output(v));
    list
}

/// Every combination of the row switches that any row kernel could be built in (dtypes of the
/// three row tensors, vector reads, odd rows, subgroups, output, in place, a few workgroup
/// sizes), less those no kernel has: an output and in place, odd rows read as vectors, 16-byte
/// reads without vectors of 16-bit input. Each row family keeps those it builds, after setting
/// its own switches.
#[cfg(test)]
pub(crate) fn variants() -> Vec<Variant> {
    use crate::dtype::DType;
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let mut out = Vec::new();
    for bits in 0..32u32 {
        for &input in &dtypes {
            for &second in &dtypes {
                for &output in &dtypes {
                    for vec8 in [false, true] {
                        let v = Variant {
                            input,
                            second,
                            output,
                            vec4: bits & 1 != 0,
                            vec8,
                            subgroup: bits & 2 != 0,
                            grad: bits & 4 != 0,
                            in_place: bits & 8 != 0,
                            odd: bits & 16 != 0,
                            // Workgroup sizes other than 256 in a few variants.
                            wg: [0, 64, 1024][(bits as usize + vec8 as usize) % 3],
                            ..Default::default()
                        };
                        let no_kernel =
                            v.grad && v.in_place || v.odd && v.vec4 || v.vec8 && !(v.vec4 && input != DType::F32);
                        if !no_kernel {
                            out.push(v);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The variants of [`variants`] a family builds (`keep`).
#[cfg(test)]
pub(crate) fn keep(keep: impl Fn(&Variant) -> bool) -> Vec<Variant> {
    variants().into_iter().filter(|v| keep(v)).collect()
}

/// Whether `v`'s second and output rows are f32.
#[cfg(test)]
pub(crate) fn f32_second_and_output(v: &Variant) -> bool {
    use crate::dtype::DType;
    v.second == DType::F32 && v.output == DType::F32
}

/// Whether every row tensor of `v` is f32 and read one element at a time (the kernels without
/// vector or 16-bit access).
#[cfg(test)]
pub(crate) fn f32_scalar(v: &Variant) -> bool {
    !v.vec4 && !v.odd && v.input == crate::dtype::DType::F32 && f32_second_and_output(v)
}
