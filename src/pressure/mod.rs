//! Memory relief: moving VMs off a hypervisor whose memory runs low,
//! before the kernel's OOM killer ends a guest. Plain logic here (reading
//! `/proc/meminfo`, judging pressure, choosing the VM and its destination);
//! the daemon's relief task carries it out.

pub mod choice;
pub mod detector;
pub mod meminfo;
