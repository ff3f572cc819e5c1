//! The CPU features the build assumes, checked at startup.
//!
//! `.cargo/config.toml` compiles with AVX2 and PCLMULQDQ so sonic-rs uses its SIMD
//! paths. A binary built that way would die with SIGILL on an older CPU; calling
//! [`ensure_supported`] first thing in `main` turns that into a clear error. The check is
//! compiled in only when the build enabled those features.

/// The build needs a CPU feature this machine lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this binary was built for x86-64 CPUs with {feature} (Intel Haswell / AMD Excavator or newer) and this CPU lacks it; \
     rebuild without the flags in .cargo/config.toml (RUSTFLAGS=\"\" cargo build --release) for a portable binary"
)]
pub struct UnsupportedCpu {
    pub feature: &'static str,
}

/// Fails when the CPU lacks a feature this binary was compiled to use.
pub fn ensure_supported() -> Result<(), UnsupportedCpu> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if !std::arch::is_x86_feature_detected!("avx2") {
        return Err(UnsupportedCpu { feature: "AVX2" });
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "pclmulqdq"))]
    if !std::arch::is_x86_feature_detected!("pclmulqdq") {
        return Err(UnsupportedCpu { feature: "PCLMULQDQ" });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_machine_running_the_tests_supports_the_build() {
        assert_eq!(super::ensure_supported(), Ok(()));
    }
}
