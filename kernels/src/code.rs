//! Integer code types a quantized tensor is stored in.

mod private {
    pub trait Sealed {}
    impl Sealed for i8 {}
    impl Sealed for u8 {}
    impl Sealed for i16 {}
    impl Sealed for u16 {}
}

/// Which concrete type a [`Code`] is (lets SIMD paths pick their narrowing at compile time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeKind {
    I8,
    U8,
    I16,
    U16,
}

/// An integer type that holds quantized codes: `i8`, `u8` (1..=8-bit codes) and `i16`,
/// `u16` (16-bit codes). Sub-byte codes live in the 8-bit types with a narrower
/// `[qmin, qmax]` and are bit-packed for storage (see [`crate::pack`]).
pub trait Code: Copy + Default + Send + Sync + std::fmt::Debug + 'static + private::Sealed {
    const MIN: i32;
    const MAX: i32;
    const KIND: CodeKind;
    const NAME: &'static str;
    /// Converts a value already inside `[MIN, MAX]`.
    fn from_i32(v: i32) -> Self;
    fn to_i32(self) -> i32;
}

macro_rules! impl_code {
    // expands to: impl Code for $t { MIN/MAX from the type, KIND, NAME, lossless conversions }
    ($t:ty, $kind:ident, $name:literal) => {
        impl Code for $t {
            const MIN: i32 = <$t>::MIN as i32;
            const MAX: i32 = <$t>::MAX as i32;
            const KIND: CodeKind = CodeKind::$kind;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn from_i32(v: i32) -> Self {
                debug_assert!((<Self as Code>::MIN..=<Self as Code>::MAX).contains(&v));
                v as $t
            }
            #[inline(always)]
            fn to_i32(self) -> i32 {
                self as i32
            }
        }
    };
}

impl_code!(i8, I8, "i8");
impl_code!(u8, U8, "u8");
impl_code!(i16, I16, "i16");
impl_code!(u16, U16, "u16");
