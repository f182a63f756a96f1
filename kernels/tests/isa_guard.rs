//! The coverage guard: when `QUANTBENCH_ISA` forces a path, the default dispatch must run on
//! exactly that path (so a CI job that forces AVX2 really tests AVX2); without it, the best
//! path the CPU has is chosen. Also: forcing an ISA the CPU lacks is an error.

use quantbench_kernels::isa::{self, isa_from_env, Isa};
use quantbench_kernels::{Kernels, QuantParams};

#[test]
fn default_dispatch_runs_the_forced_or_best_path() {
    let expected = isa_from_env()
        .expect("QUANTBENCH_ISA must be valid for this test")
        .unwrap_or_else(Isa::best);
    eprintln!(
        "QUANTBENCH_ISA={:?}: expecting {expected}",
        std::env::var(isa::ISA_ENV).ok()
    );
    assert_eq!(isa::active(), expected);
    let p = QuantParams::with_bits(0.1, 0, 8, true).unwrap();
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
    let mut q = vec![0i8; x.len()];
    quantbench_kernels::linear::quantize_f32_i8(&x, &p, &mut q).unwrap();
    assert!(isa::has_run(expected), "the {expected} path never ran");
    for other in Isa::ALL {
        if other != expected {
            assert!(
                !isa::has_run(other),
                "{other} ran although {expected} is active"
            );
        }
    }
}

#[test]
fn unsupported_isas_are_refused() {
    for isa in Isa::ALL {
        match Kernels::new(isa) {
            Ok(k) => assert!(isa.is_supported() && k.isa() == isa),
            Err(e) => {
                assert!(!isa.is_supported());
                assert!(e.to_string().contains("not supported by this CPU"), "{e}");
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    assert!(Kernels::new(Isa::Neon).is_err());
    assert_eq!(Isa::from_name("AVX512"), Some(Isa::Avx512));
    assert_eq!(Isa::from_name("sse"), None);
}
