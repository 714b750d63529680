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

/// A device name (`cpu`, `cuda`, `cuda:N`) as a device this process can use: a CUDA device on a
/// CPU-only build, or one beyond those visible, is an error that says so.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    let device = match name {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => {
                return Err(Error::Device(format!(
                    "device `{d}` is not cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if let tch::Device::Cuda(n) = device {
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
    }
    Ok(device)
}

/// A dtype name (`f32`, `bf16`, `f16` or PyTorch's long names) as a tensor kind.
pub fn parse_dtype(name: &str) -> Result<tch::Kind> {
    match name {
        "f32" | "float32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f16" | "float16" => Ok(tch::Kind::Half),
        d => Err(Error::Device(format!(
            "dtype `{d}` is not f32, bf16 or f16"
        ))),
    }
}

/// Load options for a model on `device` in `dtype`. The first call logs which libtorch build and
/// device the process got.
pub fn load_options(device: &str, dtype: &str) -> Result<optimsyn_lm::LoadOptions> {
    let device = parse_device(device)?;
    let kind = parse_dtype(dtype)?;
    static ANNOUNCED: std::sync::Once = std::sync::Once::new();
    ANNOUNCED.call_once(|| {
        let on = match device {
            tch::Device::Cuda(n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        };
        tracing::info!("{}; models on {on}", build_line());
    });
    Ok(optimsyn_lm::LoadOptions { kind, device })
}

#[cfg(test)]
mod tests {
    use super::*;

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
