"""Data of the synthetic Windows guests: OS profiles, module sets, cached files.

Plain tables, no logic beyond assembling them. The figures and their
sources are in docs/synthetic-windows.md; sizes are SizeOfImage of the
named builds where the reference collection gives one (ntoskrnl.exe) and
typical sizes of the era's System32 files otherwise: plausible, not exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import mmh3

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Families in release order; a catalogue entry exists from ``since`` on (and
#: until ``until``, exclusive, when set).
FAMILIES = ("2000", "xp", "7", "10")


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """One image of a profile's module set."""

    name: str
    version: str
    size: int  # SizeOfImage, bytes, page multiple
    kernel: bool


@dataclass(frozen=True, slots=True)
class Profile:
    """What a freshly booted, lightly used guest of one Windows release holds.

    Attributes:
        name: the VirtualBox ``os_type`` (also the modules' ``guest_os``).
        arch: ``x86`` or ``x64``; decides pointer width and fixup density.
        default_size: memory when the machine's memory_size_bytes is 0.
        working_set: bytes in use (not zero) at ``default_size``; memory
            beyond it is zeroed free RAM.
        aslr: images load at per-boot random bases (Vista and later).
        fixup_pages: range of the share of image pages that carry fixups.
        cache_share, compressed_share, dup_share, ff_share: shares of the
            in-use memory outside images that are page cache, compressed store
            pages, duplicates within the machine, and all-0xFF pages; the rest
            is private heap, stack and pool data.
    """

    name: str
    family: str
    arch: str
    build: str
    default_size: int
    working_set: int
    aslr: bool
    fixup_pages: tuple[float, float]
    cache_share: float
    compressed_share: float
    dup_share: float
    ff_share: float
    modules: tuple[ModuleSpec, ...]
    cache_files: tuple[tuple[str, int], ...]


# name, kernel?, size in KiB on Windows 10 x64, since, until
_CATALOGUE: tuple[tuple[str, bool, int, str, str | None], ...] = (
    # kernel, HAL and boot drivers
    ("ntoskrnl.exe", True, 10_548, "2000", None),
    ("hal.dll", True, 556, "2000", None),
    ("kdcom.dll", True, 48, "2000", None),
    ("BOOTVID.dll", True, 48, "2000", None),
    ("ci.dll", True, 900, "7", None),
    ("PSHED.dll", True, 100, "7", None),
    ("CLFS.SYS", True, 420, "7", None),
    ("tm.sys", True, 180, "7", None),
    ("msrpc.sys", True, 380, "7", None),
    ("cng.sys", True, 760, "7", None),
    ("ksecdd.sys", True, 150, "2000", None),
    ("Wdf01000.sys", True, 820, "7", None),
    ("WDFLDR.SYS", True, 80, "7", None),
    ("acpi.sys", True, 580, "2000", None),
    ("WMILIB.SYS", True, 40, "2000", None),
    ("pci.sys", True, 300, "2000", None),
    ("partmgr.sys", True, 200, "2000", None),
    ("volmgr.sys", True, 120, "7", None),
    ("volmgrx.sys", True, 400, "7", None),
    ("mountmgr.sys", True, 120, "2000", None),
    ("atapi.sys", True, 60, "2000", None),
    ("ataport.SYS", True, 200, "7", None),
    ("storport.sys", True, 720, "7", None),
    ("disk.sys", True, 130, "2000", None),
    ("CLASSPNP.SYS", True, 400, "2000", None),
    ("FLTMGR.SYS", True, 480, "xp", None),
    ("Ntfs.sys", True, 2_900, "2000", None),
    ("fvevol.sys", True, 720, "7", None),
    ("volsnap.sys", True, 420, "xp", None),
    ("spaceport.sys", True, 640, "10", None),
    ("mup.sys", True, 160, "2000", None),
    ("Npfs.SYS", True, 120, "2000", None),
    ("Msfs.SYS", True, 80, "2000", None),
    ("NETIO.SYS", True, 700, "7", None),
    ("ndis.sys", True, 1_500, "2000", None),
    ("tcpip.sys", True, 3_000, "2000", None),
    ("afd.sys", True, 640, "2000", None),
    ("netbt.sys", True, 300, "2000", None),
    ("HTTP.sys", True, 1_700, "xp", None),
    ("mrxsmb.sys", True, 560, "2000", None),
    ("rdbss.sys", True, 470, "2000", None),
    ("srv2.sys", True, 800, "7", None),
    ("win32k.sys", True, 3_400, "2000", "10"),
    ("win32k.sys", True, 600, "10", None),
    ("win32kbase.sys", True, 2_600, "10", None),
    ("win32kfull.sys", True, 3_700, "10", None),
    ("dxgkrnl.sys", True, 3_400, "7", None),
    ("dxgmms2.sys", True, 760, "7", None),
    ("cdd.dll", True, 260, "7", None),
    ("watchdog.sys", True, 100, "xp", None),
    ("VIDEOPRT.SYS", True, 140, "2000", None),
    ("vga.sys", True, 40, "2000", "10"),
    ("BasicDisplay.sys", True, 120, "10", None),
    ("mouclass.sys", True, 80, "2000", None),
    ("kbdclass.sys", True, 80, "2000", None),
    ("i8042prt.sys", True, 140, "2000", None),
    ("usbport.sys", True, 520, "2000", None),
    ("usbhub.sys", True, 420, "2000", None),
    ("HDAudBus.sys", True, 140, "xp", None),
    ("E1G6032E.sys", True, 200, "2000", "7"),
    ("e1i63x64.sys", True, 520, "7", None),
    ("intelppm.sys", True, 260, "xp", None),
    ("crashdmp.sys", True, 120, "7", None),
    ("WdFilter.sys", True, 420, "10", None),
    ("rdyboost.sys", True, 300, "7", None),
    ("fastfat.SYS", True, 400, "2000", None),
    ("cdrom.sys", True, 200, "2000", None),
    ("Beep.SYS", True, 16, "2000", None),
    ("Null.SYS", True, 12, "2000", None),
    ("VBoxGuest.sys", True, 260, "2000", None),
    # user mode
    ("ntdll.dll", False, 1_980, "2000", None),
    ("kernel32.dll", False, 760, "2000", None),
    ("KernelBase.dll", False, 2_700, "7", None),
    ("user32.dll", False, 1_640, "2000", None),
    ("gdi32.dll", False, 160, "2000", None),
    ("gdi32full.dll", False, 1_060, "10", None),
    ("win32u.dll", False, 140, "10", None),
    ("advapi32.dll", False, 680, "2000", None),
    ("sechost.dll", False, 620, "7", None),
    ("rpcrt4.dll", False, 1_180, "2000", None),
    ("msvcrt.dll", False, 640, "2000", None),
    ("ucrtbase.dll", False, 1_020, "10", None),
    ("msvcp_win.dll", False, 640, "10", None),
    ("combase.dll", False, 3_400, "10", None),
    ("ole32.dll", False, 1_380, "2000", None),
    ("oleaut32.dll", False, 820, "2000", None),
    ("shell32.dll", False, 7_200, "2000", None),
    ("shlwapi.dll", False, 360, "2000", None),
    ("SHCore.dll", False, 720, "10", None),
    ("windows.storage.dll", False, 7_800, "10", None),
    ("comctl32.dll", False, 2_400, "xp", None),
    ("comdlg32.dll", False, 900, "2000", None),
    ("uxtheme.dll", False, 640, "xp", None),
    ("msctf.dll", False, 1_400, "xp", None),
    ("imm32.dll", False, 200, "2000", None),
    ("ws2_32.dll", False, 420, "2000", None),
    ("mswsock.dll", False, 420, "2000", None),
    ("dnsapi.dll", False, 780, "2000", None),
    ("IPHLPAPI.DLL", False, 220, "2000", None),
    ("nsi.dll", False, 40, "7", None),
    ("crypt32.dll", False, 1_400, "2000", None),
    ("bcrypt.dll", False, 160, "7", None),
    ("bcryptPrimitives.dll", False, 520, "7", None),
    ("msasn1.dll", False, 80, "2000", None),
    ("wintrust.dll", False, 460, "2000", None),
    ("setupapi.dll", False, 4_400, "2000", None),
    ("cfgmgr32.dll", False, 300, "2000", None),
    ("winhttp.dll", False, 1_100, "xp", None),
    ("wininet.dll", False, 4_600, "2000", None),
    ("urlmon.dll", False, 1_700, "2000", None),
    ("iertutil.dll", False, 2_300, "7", None),
    ("netapi32.dll", False, 120, "2000", None),
    ("profapi.dll", False, 120, "7", None),
    ("powrprof.dll", False, 320, "7", None),
    ("propsys.dll", False, 1_300, "7", None),
    ("twinapi.appcore.dll", False, 2_000, "10", None),
    ("Windows.UI.dll", False, 1_100, "10", None),
    ("Windows.UI.Xaml.dll", False, 17_500, "10", None),
    ("twinui.dll", False, 6_200, "10", None),
    ("ExplorerFrame.dll", False, 3_700, "7", None),
    ("d3d11.dll", False, 2_400, "7", None),
    ("dxgi.dll", False, 720, "7", None),
    ("d2d1.dll", False, 5_400, "7", None),
    ("DWrite.dll", False, 2_400, "7", None),
    ("WindowsCodecs.dll", False, 2_000, "7", None),
    ("mmdevapi.dll", False, 560, "7", None),
    ("AudioSes.dll", False, 1_100, "7", None),
    ("mshtml.dll", False, 23_000, "2000", None),
    ("jscript9.dll", False, 5_600, "7", None),
    ("mpengine.dll", False, 15_000, "10", None),
    ("MpClient.dll", False, 1_500, "10", None),
    ("explorer.exe", False, 4_600, "2000", None),
    ("svchost.exe", False, 60, "2000", None),
    ("lsass.exe", False, 80, "2000", None),
    ("csrss.exe", False, 24, "2000", None),
    ("winlogon.exe", False, 900, "2000", None),
    ("services.exe", False, 700, "2000", None),
    ("smss.exe", False, 160, "2000", None),
    ("wininit.exe", False, 420, "7", None),
    ("dwm.exe", False, 100, "7", None),
    ("dwmcore.dll", False, 2_800, "7", None),
    ("MsMpEng.exe", False, 140, "10", None),
    ("SearchIndexer.exe", False, 1_000, "7", None),
    ("spoolsv.exe", False, 880, "2000", None),
    ("taskhostw.exe", False, 100, "10", None),
    ("sihost.exe", False, 120, "10", None),
    ("RuntimeBroker.exe", False, 120, "10", None),
    ("ctfmon.exe", False, 20, "xp", None),
)

# Common system files whose contents the standby list caches; identical on
# every installation of one build.
_CACHE_FILES: tuple[tuple[str, int, str, str | None], ...] = (
    (r"C:\Windows\Fonts\arial.ttf", 760, "2000", None),
    (r"C:\Windows\Fonts\times.ttf", 820, "2000", None),
    (r"C:\Windows\Fonts\tahoma.ttf", 700, "2000", None),
    (r"C:\Windows\Fonts\cour.ttf", 690, "2000", None),
    (r"C:\Windows\System32\locale.nls", 820, "2000", None),
    (r"C:\Windows\System32\unicode.nls", 100, "2000", None),
    (r"C:\Windows\System32\sorttbls.nls", 400, "2000", "7"),
    (r"C:\Windows\System32\sortkey.nls", 260, "2000", "7"),
    (r"C:\Windows\System32\drivers\gm.dls", 3_350, "2000", None),
    (r"C:\Windows\System32\oembios.bin", 12_400, "xp", "7"),
    (r"C:\Windows\System32\CatRoot\{F750E6C3-38EE-11D1-85E5-00C04FC295EE}\nt5.cat", 10_500,
     "2000", "7"),
    (r"C:\Windows\Microsoft.NET\Framework\v2.0.50727\mscorlib.dll", 4_450, "xp", "10"),
    (r"C:\Windows\Microsoft.NET\Framework\v2.0.50727\System.dll", 3_100, "xp", "10"),
    (r"C:\Windows\Help\windows.hlp", 2_600, "2000", "7"),
    (r"C:\Windows\Fonts\segoeui.ttf", 960, "7", None),
    (r"C:\Windows\Fonts\seguisym.ttf", 2_100, "7", None),
    (r"C:\Windows\Fonts\msyh.ttc", 19_500, "7", None),
    (r"C:\Windows\Fonts\simsun.ttc", 17_600, "7", None),
    (r"C:\Windows\Fonts\malgun.ttf", 12_400, "7", None),
    (r"C:\Windows\Globalization\Sorting\SortDefault.nls", 2_400, "7", None),
    (r"C:\Windows\System32\en-US\shell32.dll.mui", 3_100, "7", None),
    (r"C:\Windows\System32\imageres.dll", 19_200, "7", None),
    (r"C:\Windows\System32\ieframe.dll", 12_300, "7", None),
    (r"C:\Windows\assembly\NativeImages_v4.0.30319_64\mscorlib\mscorlib.ni.dll", 22_600, "7", None),
    (r"C:\Windows\assembly\NativeImages_v4.0.30319_64\System\System.ni.dll", 10_200, "7", None),
    (r"C:\Windows\assembly\NativeImages_v4.0.30319_64\System.Xml\System.Xml.ni.dll", 8_100, "7",
     None),
    (r"C:\Windows\assembly\NativeImages_v4.0.30319_64\System.Core\System.Core.ni.dll", 9_800,
     "7", None),
    (r"C:\Windows\Fonts\seguiemj.ttf", 2_100, "10", None),
    (r"C:\ProgramData\Microsoft\Windows Defender\Definition Updates\Backup\mpavbase.vdm", 61_000,
     "10", None),
    (r"C:\ProgramData\Microsoft\Windows Defender\Definition Updates\Backup\mpasbase.vdm", 44_000,
     "10", None),
    (r"C:\Windows\System32\Windows.UI.Xaml.Controls.dll", 9_900, "10", None),
    (r"C:\Windows\System32\edgehtml.dll", 19_700, "10", None),
    (r"C:\Windows\System32\CoreMessaging.dll", 1_100, "10", None),
    (r"C:\Windows\System32\SettingSync.dll", 1_500, "10", None),
    (r"C:\Windows\SystemResources\imageres.dll.mun", 17_700, "10", None),
    (r"C:\Windows\System32\DriverStore\FileRepository\basicdisplay.inf_amd64\BasicDisplay.sys", 120,
     "10", None),
)


def _since(family: str, since: str, until: str | None) -> bool:
    rank = FAMILIES.index
    return rank(since) <= rank(family) and (until is None or rank(family) < rank(until))


def _version(build: str, revisions: tuple[int, ...], name: str) -> str:
    # Updates replace some files and not others: the revision differs per file
    # but is a fixed function of the file, as on an installation kept current.
    return f"{build}.{revisions[mmh3.hash(name, 0x7E57, signed=False) % len(revisions)]}"


def _modules(
    family: str,
    build: str,
    revisions: tuple[int, ...],
    scale: float,
    ntoskrnl_kib: int,
) -> tuple[ModuleSpec, ...]:
    out = []
    for name, kernel, kib, since, until in _CATALOGUE:
        if not _since(family, since, until):
            continue
        size_kib = ntoskrnl_kib if name == "ntoskrnl.exe" else max(8, int(kib * scale))
        size = -(-size_kib * KiB // 4096) * 4096
        out.append(ModuleSpec(name, _version(build, revisions, name), size, kernel))
    return tuple(out)


def _cache(family: str, scale: float) -> tuple[tuple[str, int], ...]:
    return tuple(
        (name, -(-int(kib * scale) * KiB // 4096) * 4096)
        for name, kib, since, until in _CACHE_FILES
        if _since(family, since, until)
    )


def _profile(
    name: str,
    family: str,
    arch: str,
    build: str,
    revisions: tuple[int, ...],
    scale: float,
    ntoskrnl_kib: int,
    default_size: int,
    working_set: int,
    **mix: float,
) -> Profile:
    return Profile(
        name=name,
        family=family,
        arch=arch,
        build=build,
        default_size=default_size,
        working_set=working_set,
        aslr=family not in ("2000", "xp"),
        fixup_pages=(0.56, 0.77) if arch == "x86" else (0.09, 0.12),
        cache_share=mix["cache"],
        compressed_share=mix.get("compressed", 0.0),
        dup_share=mix.get("dup", 0.04),
        ff_share=mix.get("ff", 0.005),
        modules=_modules(family, build, revisions, scale, ntoskrnl_kib),
        cache_files=_cache(family, 1.0),
    )


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _profile("Windows2000", "2000", "x86", "5.0.2195", (6717, 6882, 7045), 0.30, 1_700,
                 256 * MiB, 190 * MiB, cache=0.20),
        _profile("WindowsXP", "xp", "x86", "5.1.2600", (5512, 5781, 6055, 6419), 0.40, 2_200,
                 512 * MiB, 320 * MiB, cache=0.22),
        _profile("Windows7", "7", "x86", "6.1.7601", (17514, 23418, 24545), 0.55, 4_900,
                 1 * GiB, 560 * MiB, cache=0.24),
        _profile("Windows7_64", "7", "x64", "6.1.7601", (17514, 23418, 24545), 0.70, 5_600,
                 1 * GiB, 640 * MiB, cache=0.25),
        _profile("Windows10_64", "10", "x64", "10.0.19041", (1, 3636, 3803, 3930), 1.0, 10_548,
                 2 * GiB, 1230 * MiB, cache=0.22, compressed=0.06),
        _profile("Windows11_64", "10", "x64", "10.0.22621", (1, 2715, 2861, 3007), 1.1, 11_900,
                 2 * GiB, 1330 * MiB, cache=0.22, compressed=0.07),
        # Server 2019 is Windows 10 1809; memory compression is off by default on Server.
        _profile("WindowsServer2019_64", "10", "x64", "10.0.17763", (1, 5122, 5206, 5329), 0.95,
                 9_930, 2 * GiB, 1024 * MiB, cache=0.25),
    )
}
