//! Where models run: device and dtype names as load options, and one startup line naming the
//! libtorch build.

use crate::error::{Error, Result};

/// Which libtorch build this process runs on, in one line: CUDA or CPU-only, and the devices.
pub fn build_line() -> String {
    if tch::utils::has_cuda() {
        let v = tch::utils::version_cudart();
        format!(
            "libtorch for PyTorch 2.13 with CUDA {}.{}, {} CUDA device(s) visible",
            v / 1000,
            (v % 1000) / 10,
            tch::Cuda::device_count()
        )
    } else {
        format!(
            "libtorch for PyTorch 2.13, CPU-only build, {} threads",
            tch::get_num_threads()
        )
    }
}

/// Where a model runs, as configs and command lines name it: `cpu`, `cuda` (= `cuda:0`) or
/// `cuda:N`. [`DeviceName::resolve`] checks that this process can use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceName {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceName {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(DeviceName::Cpu),
            "cuda" => Ok(DeviceName::Cuda(0)),
            d => d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceName::Cuda)
                .ok_or_else(|| Error::Device(format!("device `{d}` is not cpu, cuda or cuda:N"))),
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceName::Cpu => f.write_str("cpu"),
            DeviceName::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceName {
    /// The device, when this process can use it: a CUDA device on a CPU-only build, or one beyond
    /// those visible, is an error that says so.
    pub fn resolve(self) -> Result<tch::Device> {
        let DeviceName::Cuda(n) = self else {
            return Ok(tch::Device::Cpu);
        };
        if !tch::utils::has_cuda() {
            return Err(Error::Device(format!(
                "device cuda:{n}: this libtorch is a CPU-only build ({}); install a CUDA build \
                 (README: \"GPUs\") or run on the CPU",
                build_line()
            )));
        }
        let have = tch::Cuda::device_count();
        if n as i64 >= have {
            return Err(Error::Device(format!(
                "device cuda:{n}: this machine has {have} CUDA device(s) visible to {} (driver, \
                 CUDA_VISIBLE_DEVICES?)",
                build_line()
            )));
        }
        Ok(tch::Device::Cuda(n))
    }
}

/// The dtype a model is loaded in: `f32`, `bf16`, `f16` (or PyTorch's `float32`, `bfloat16`,
/// `float16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl std::str::FromStr for Dtype {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            d => Err(Error::Device(format!(
                "dtype `{d}` is not f32, bf16 or f16"
            ))),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

impl Dtype {
    /// The tensor kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }
}

/// Both names travel as their strings in configs (`device = "cuda:1"`, `dtype = "bf16"`).
macro_rules! serde_as_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_str!(DeviceName);
serde_as_str!(Dtype);

/// A device name (`cpu`, `cuda`, `cuda:N`) as a device this process can use.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    name.parse::<DeviceName>()?.resolve()
}

/// A dtype name (`f32`, `bf16`, `f16` or PyTorch's long names) as a tensor kind.
pub fn parse_dtype(name: &str) -> Result<tch::Kind> {
    Ok(name.parse::<Dtype>()?.kind())
}

/// Load options for a model on `device` in `dtype`. The first call logs which libtorch build and
/// device the process got.
pub fn load_options(device: DeviceName, dtype: Dtype) -> Result<optimsyn_lm::LoadOptions> {
    let resolved = device.resolve()?;
    static ANNOUNCED: std::sync::Once = std::sync::Once::new();
    ANNOUNCED.call_once(|| tracing::info!("{}; models on {device}", build_line()));
    Ok(optimsyn_lm::LoadOptions {
        kind: dtype.kind(),
        device: resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_their_strings() {
        for name in ["cpu", "cuda:0", "cuda:3"] {
            let d: DeviceName = name.parse().expect(name);
            assert_eq!(d.to_string(), name);
        }
        assert_eq!("cuda".parse::<DeviceName>().ok(), Some(DeviceName::Cuda(0)));
        for name in ["f32", "bf16", "f16"] {
            assert_eq!(
                name.parse::<Dtype>().map(|d| d.to_string()).ok().as_deref(),
                Some(name)
            );
        }
        let e = "cuda:x".parse::<DeviceName>().err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("device `cuda:x` is not cpu, cuda or cuda:N")
        );
    }

    #[test]
    fn names_map_to_devices_and_kinds() {
        assert_eq!(parse_device("cpu").ok(), Some(tch::Device::Cpu));
        assert_eq!(parse_dtype("bfloat16").ok(), Some(tch::Kind::BFloat16));
        let e = parse_device("gpu").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("device `gpu` is not cpu, cuda or cuda:N")
        );
        let e = parse_dtype("f8").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("dtype `f8` is not f32, bf16 or f16"));
        if !tch::utils::has_cuda() {
            let e = parse_device("cuda:1").err().map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains("CPU-only build")));
        }
    }
}
