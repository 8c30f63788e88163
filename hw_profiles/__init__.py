"""Device profiles: latency measurements of subnets on a device's runtime, and the profiler."""

from nestnas.hw_profiles.calibrate import SpeedCalibration, speed_factor
from nestnas.hw_profiles.devices import list_profiles, user_dir
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.hw_profiles.profiler import LocalMeasurer, block_table, profile_device
from nestnas.hw_profiles.sampling import space_filling_sample

__all__ = ["DeviceProfile", "LocalMeasurer", "SpeedCalibration", "block_table", "list_profiles", "profile_device",
           "space_filling_sample", "speed_factor", "user_dir"]
