//! Device names (`cpu`, `cuda:N`, `metal:N`) and dtype choice.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use super::error::{candle_message, LoadError};

/// A device as named in configuration and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
    /// An Apple GPU by ordinal.
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let ordinal = |rest: &str| {
            rest.parse::<usize>()
                .map_err(|_| format!("invalid device {text:?}: expected cpu, cuda:N or metal:N"))
        };
        match text {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal(0)),
            _ => match text.split_once(':') {
                Some(("cuda", rest)) => ordinal(rest).map(DeviceSpec::Cuda),
                Some(("metal", rest)) => ordinal(rest).map(DeviceSpec::Metal),
                _ => Err(format!(
                    "invalid device {text:?}: expected cpu, cuda:N or metal:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Creates the candle device. Create each GPU device once and clone it: two devices made
    /// for the same ordinal cannot mix tensors.
    pub fn open(self) -> Result<Device, LoadError> {
        let unavailable = |reason: String| LoadError::DeviceUnavailable {
            device: self.to_string(),
            reason,
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(unavailable(
                        "this binary was built without the `cuda` feature".to_string(),
                    ));
                }
                Device::new_cuda(ordinal).map_err(|err| unavailable(candle_message(&err)))
            }
            DeviceSpec::Metal(ordinal) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(unavailable(
                        "this binary was built without the `metal` feature".to_string(),
                    ));
                }
                Device::new_metal(ordinal).map_err(|err| unavailable(candle_message(&err)))
            }
        }
    }
}

/// The dtype asked for in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// bf16 on CUDA, f32 elsewhere.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl FromStr for DTypeChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(DTypeChoice::Auto),
            "f32" | "float32" => Ok(DTypeChoice::F32),
            "f16" | "float16" => Ok(DTypeChoice::F16),
            "bf16" | "bfloat16" => Ok(DTypeChoice::Bf16),
            _ => Err(format!(
                "invalid dtype {text:?}: expected auto, f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeChoice::Auto => "auto",
            DTypeChoice::F32 => "f32",
            DTypeChoice::F16 => "f16",
            DTypeChoice::Bf16 => "bf16",
        })
    }
}

impl DTypeChoice {
    /// Resolves the choice for a device and checks that the device can compute in that dtype
    /// (a small matmul and softmax are run once).
    pub fn resolve(self, device: &Device) -> Result<DType, LoadError> {
        let dtype = match self {
            DTypeChoice::Auto if device.is_cuda() => DType::BF16,
            DTypeChoice::Auto | DTypeChoice::F32 => DType::F32,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::Bf16 => DType::BF16,
        };
        probe(dtype, device).map_err(|err| LoadError::UnsupportedDtype {
            dtype: self.to_string(),
            device: device_label(device),
            reason: err.to_string(),
        })?;
        Ok(dtype)
    }
}

fn probe(dtype: DType, device: &Device) -> candle_core::Result<()> {
    let a = Tensor::ones((2, 2), dtype, device)?;
    let product = a.matmul(&a)?;
    candle_nn::ops::softmax_last_dim(&product)?.to_dtype(DType::F32)?;
    Ok(())
}

/// Returns a short name for a candle device (`cpu`, `cuda`, `metal`).
pub fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// One lock per GPU ordinal (modulo its length) that loads take in turn.
static GPU_LOADS: [Mutex<()>; 16] = [const { Mutex::new(()) }; 16];

/// Waits for this device's turn to load (GPUs only; `None` on the CPU): a load's memory is
/// measured as the change in the device's use, which a concurrent load would blur, and two
/// loads racing for the last free memory would both fail.
pub fn gpu_load_turn(device: &Device) -> Option<MutexGuard<'static, ()>> {
    let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() else {
        return None;
    };
    let lock = GPU_LOADS.get(gpu_id % GPU_LOADS.len())?;
    Some(lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// Bytes in use on the GPU behind `device` (its total minus its free memory, whichever
/// process holds them), or `None` on the CPU.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// Bytes the device could still hand out: the GPU's free memory, or the host's
/// `MemAvailable` for the CPU (`None` where neither can be read).
pub fn available_memory(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, _) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        Device::Cpu => proc_bytes("/proc/meminfo", "MemAvailable:"),
        _ => None,
    }
}

/// A `key  N kB` line of a `/proc` file (`/proc/meminfo`, `/proc/<pid>/status`) in bytes.
pub fn proc_bytes(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!(
            "metal:0".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Metal(0)
        );
        assert!("tpu:0".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn cpu_runs_every_float_dtype_and_auto_is_f32() {
        assert_eq!(DTypeChoice::Auto.resolve(&Device::Cpu).unwrap(), DType::F32);
        assert_eq!(DTypeChoice::F16.resolve(&Device::Cpu).unwrap(), DType::F16);
        assert_eq!(
            DTypeChoice::Bf16.resolve(&Device::Cpu).unwrap(),
            DType::BF16
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("`cuda` feature"),
            "{err}"
        );
    }
}
