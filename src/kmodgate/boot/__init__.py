"""The load check: boot a kernel under QEMU and let it decide whether modules load.

* kernel_image.py: a bootable kernel (vmlinuz + modules) from a reference;
* initramfs.py: busybox, the modules, and an /init that insmods them;
* qemu.py: accelerator detection, boots with time limits, the serial console;
* loadcheck.py: run_load_checks / run_load_matrix -> CheckResult(kind="load"),
  and agreement() of the abi check's predictions with the kernel's verdicts.
"""
