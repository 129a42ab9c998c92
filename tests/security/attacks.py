"""The attack table: (id, category, code, expectation).

Code templates get ``{CANARY_FILE}``, ``{KEY_FILE}``, ``{MARKER}``,
``{MARKER2}``, ``{TCP_PORT}``, ``{UDP_PORT}``, ``{UNIX_NAME}``,
``{HOST_PID}``, ``{SERVER_PID}`` filled in. ``PAYLOAD`` defines
``_payload(m)``: given anything with the ``os`` API it tries to read the
canary file and the key file, write marker files outside scratch, run a
shell, and dump the environment; ``_popen(P)`` does the same through a
``Popen``-like callable. An escape technique that gets that far must still
be contained by the kernel layers.

Expectations: ``"contained"``; ``"limit:X"`` (under guard "none" the
result's ``limit`` must be X; under the allowlist guard it may instead have
been refused before it ran).
"""

from __future__ import annotations

from typing import NamedTuple


class Attack(NamedTuple):
    id: str
    category: str
    code: str
    expect: str = "contained"


PAYLOAD = r"""
def _payload(m):
    res = []
    for step in ("read", "key", "write", "mkdir", "system", "environ", "proc"):
        try:
            if step == "read":
                fd = m.open("{CANARY_FILE}", 0); res.append(m.read(fd, 200))
            elif step == "key":
                fd = m.open("{KEY_FILE}", 0); res.append(m.read(fd, 200))
            elif step == "write":
                fd = m.open("{MARKER}", 0o101, 0o644); m.write(fd, b"pwned"); res.append("wrote")
            elif step == "mkdir":
                m.mkdir("{MARKER2}"); res.append("made dir")
            elif step == "system":
                res.append(m.system("cat {CANARY_FILE} > {MARKER2}"))
            elif step == "environ":
                res.append(dict(m.environ))
            elif step == "proc":
                fd = m.open("/proc/{HOST_PID}/environ", 0); res.append(m.read(fd, 100000))
        except BaseException as e:
            res.append(type(e).__name__)
    print(res)
    return res

def _popen(P):
    try:
        p = P(["/bin/sh", "-c", "cat {CANARY_FILE}; touch {MARKER}"], stdout=-1)
        print(p.communicate())
    except BaseException as e:
        print(type(e).__name__, e)
"""


def esc(id: str, category: str, body: str) -> Attack:
    return Attack(id, category, PAYLOAD + body)


ATTACKS: list[Attack] = [
    # ---------------------------------------------------------------- imports
    esc("import_os", "imports", "import os\n_payload(os)"),
    esc("import_posix", "imports", "import posix\n_payload(posix)"),
    esc("dunder_import", "imports", "_payload(__import__('os'))"),
    esc(
        "builtins_dict_import",
        "imports",
        "_payload(__builtins__['__import__']('os') if isinstance(__builtins__, dict) else __builtins__.__import__('os'))",
    ),
    esc("importlib_import_module", "imports", "import importlib\n_payload(importlib.import_module('os'))"),
    esc("import_subprocess", "imports", "import subprocess\n_popen(subprocess.Popen)"),
    esc("import_pty", "imports", "import pty\npty.spawn(['/bin/sh', '-c', 'touch {MARKER}'])"),
    esc("exec_import_string", "imports", "exec('import os\\n_payload(os)')"),
    esc("eval_dunder_import", "imports", "_payload(eval(\"__import__('os')\"))"),
    esc("compile_import", "imports", "exec(compile('import os as o', 'x', 'exec'), globals())\n_payload(o)"),
    esc(
        "import_shutil",
        "imports",
        "import shutil\nshutil.copy('{CANARY_FILE}', '{MARKER}')\nprint(open('{MARKER}').read())",
    ),
    esc(
        "import_multiprocessing",
        "imports",
        "import multiprocessing\np = multiprocessing.Process(target=print, args=(open('{CANARY_FILE}').read(),))\np.start(); p.join()",
    ),
    # --------------------------------------------------------- module hops
    esc("random_os", "module_hops", "import random\n_payload(random._os)"),
    esc("warnings_sys_modules", "module_hops", "import warnings\n_payload(warnings.sys.modules['os'])"),
    esc("json_decoder_re_hop", "module_hops", "import json\n_payload(json.decoder.re.sys.modules['os'])"),
    esc("sys_modules_direct", "module_hops", "import sys\n_payload(sys.modules['os'])"),
    esc("typing_sys", "module_hops", "import typing\n_payload(typing.sys.modules['os'])"),
    esc("collections_sys", "module_hops", "import collections\n_payload(collections._sys.modules['os'])"),
    esc("datetime_time_hop", "module_hops", "import dataclasses\n_payload(dataclasses.sys.modules['posix'])"),
    esc(
        "traceback_linecache_os",
        "module_hops",
        "import string\n_payload(string._re._compiler._sre.__loader__.__class__.__dict__ and __import__('os'))",
    ),
    esc("uuid_os", "module_hops", "import uuid\n_payload(uuid.os)"),
    esc("base64_struct_hop", "module_hops", "import calendar\n_payload(calendar.sys.modules['os'])"),
    # ----------------------------------------------------- subclasses walks
    esc(
        "subclasses_wrap_close",
        "subclasses",
        "c = [k for k in ().__class__.__base__.__subclasses__() if k.__name__ == '_wrap_close'][0]\n_payload(c.__init__.__globals__['sys'].modules['os'])",
    ),
    esc(
        "subclasses_popen",
        "subclasses",
        "import subprocess\nP = [k for k in object.__subclasses__() if k.__name__ == 'Popen']\n_popen(P[0] if P else subprocess.Popen)",
    ),
    esc(
        "subclasses_os_system",
        "subclasses",
        "for k in object.__subclasses__():\n    g = getattr(getattr(k, '__init__', None), '__globals__', None)\n    if g and 'system' in g:\n        g['system']('touch {MARKER}'); break\n    if g and 'os' in g and hasattr(g['os'], 'system'):\n        _payload(g['os']); break",
    ),
    esc(
        "subclasses_builtin_importer",
        "subclasses",
        "B = [k for k in object.__subclasses__() if 'BuiltinImporter' in k.__name__][0]\n_payload(B.load_module('posix'))",
    ),
    esc(
        "mro_walk",
        "subclasses",
        "o = ''.__class__.__mro__[-1]\nfor k in o.__subclasses__():\n    if k.__name__ == 'catch_warnings':\n        _payload(k()._module.__builtins__['__import__']('os'))",
    ),
    esc(
        "type_subclasses_call",
        "subclasses",
        "for k in type.__subclasses__(type):\n    pass\n_payload(type(().__class__).__subclasses__(type)[0].__module__ and __import__('os'))",
    ),
    # ------------------------------------------------ frames and tracebacks
    esc(
        "traceback_frame_builtins",
        "frames",
        "try:\n    1/0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame\n    while f.f_back: f = f.f_back\n    _payload(f.f_globals['os'] if 'os' in f.f_globals else f.f_builtins['__import__']('os'))",
    ),
    esc(
        "generator_frame_walk",
        "frames",
        "def g():\n    yield 1\nx = g(); next(x)\nf = x.gi_frame.f_back or x.gi_frame\nwhile f.f_back: f = f.f_back\n_payload(f.f_builtins['__import__']('os'))",
    ),
    esc(
        "sys_getframe",
        "frames",
        "import sys\nf = sys._getframe()\nwhile f.f_back: f = f.f_back\n_payload(f.f_globals.get('os') or f.f_builtins['__import__']('os'))",
    ),
    esc(
        "coroutine_frame",
        "frames",
        "async def c():\n    pass\nco = c()\nf = co.cr_frame\nco.close()\n_payload(f.f_builtins['__import__']('os'))",
    ),
    esc(
        "exception_context_frames",
        "frames",
        "try:\n    raise ValueError\nexcept ValueError as e:\n    tb = e.__traceback__\n_payload(tb.tb_frame.f_builtins['__import__']('os'))",
    ),
    esc("host_stub_globals", "frames", "print([k for k in dir()])\nimport os\n_payload(os)"),
    # ------------------------------------------------- function internals
    esc(
        "func_globals",
        "function_internals",
        "def f(): pass\n_payload(f.__globals__['__builtins__']['__import__']('os') if isinstance(f.__globals__['__builtins__'], dict) else f.__globals__['__builtins__'].__import__('os'))",
    ),
    esc(
        "code_replace",
        "function_internals",
        "def f(): return 1\ndef g(): import os; return os\nf.__code__ = g.__code__\n_payload(f())",
    ),
    esc(
        "build_code_object",
        "function_internals",
        "import types\nsrc = compile('import os', 'x', 'exec')\nns = {}\nexec(types.CodeType(*[getattr(src, a) for a in ('co_argcount','co_posonlyargcount','co_kwonlyargcount','co_nlocals','co_stacksize','co_flags','co_code','co_consts','co_names','co_varnames','co_filename','co_name','co_qualname','co_firstlineno','co_linetable','co_exceptiontable','co_freevars','co_cellvars')]), ns)\n_payload(ns['os'])",
    ),
    esc(
        "function_type_globals",
        "function_internals",
        "FT = type(lambda: 0)\nf = FT(compile('import os as o', 'x', 'exec'), {'__builtins__': __builtins__})\nf()\nimport os\n_payload(os)",
    ),
    esc(
        "closure_cell",
        "function_internals",
        "def outer():\n    import os\n    def inner(): return os\n    return inner\n_payload(outer().__closure__[0].cell_contents)",
    ),
    esc(
        "defaults_hop",
        "function_internals",
        "def f(m=__import__('os')): return m\n_payload(f.__defaults__[0])",
    ),
    esc("stub_function_globals", "function_internals", "g = print.__self__\n_payload(g.__import__('os'))"),
    # ------------------------------------------------------- format strings
    esc(
        "format_globals",
        "format_strings",
        "def f(): pass\nprint('{0.__globals__}'.format(f))\nimport os\n_payload(os)",
    ),
    esc(
        "format_class_walk",
        "format_strings",
        "print('{0.__class__.__base__.__subclasses__}'.format(()))\n_payload(__import__('os'))",
    ),
    esc(
        "format_map_attr",
        "format_strings",
        "print('{x.__init__.__globals__}'.format_map({'x': ValueError}))\n_payload(__import__('os'))",
    ),
    esc(
        "string_formatter",
        "format_strings",
        "import string\nprint(string.Formatter().format('{0.__class__.__mro__}', 1))\n_payload(__import__('os'))",
    ),
    esc(
        "fstring_attr",
        "format_strings",
        "import os\nprint(f'{os.environ}')\nprint(f\"{open('{CANARY_FILE}').read()}\")",
    ),
    # -------------------------------------------------- indirect getattr
    esc(
        "getattr_string_concat",
        "indirect_getattr",
        "g = getattr(print, '__se' + 'lf__')\n_payload(getattr(g, '__imp' + 'ort__')('os'))",
    ),
    esc(
        "operator_attrgetter",
        "indirect_getattr",
        "import operator\nf = operator.attrgetter('__globals__')\ndef h(): pass\n_payload(f(h)['__builtins__']['__import__']('os'))",
    ),
    esc(
        "object_getattribute",
        "indirect_getattr",
        "b = object.__getattribute__(print, '__self__')\n_payload(b.__import__('os'))",
    ),
    esc("vars_builtins", "indirect_getattr", "_payload(vars(print.__self__)['__import__']('os'))"),
    esc(
        "type_dict_lookup",
        "indirect_getattr",
        "f = type.__dict__['__subclasses__']\nprint(f(object)[:3])\n_payload(__import__('os'))",
    ),
    esc(
        "getattr_via_functools",
        "indirect_getattr",
        "import functools\nga = functools.partial(getattr, print)\n_payload(ga('__self__').__import__('os'))",
    ),
    # ------------------------------------------------------ ctypes / native
    esc(
        "ctypes_system", "native", "import ctypes\nctypes.CDLL(None).system(b'cat {CANARY_FILE} > {MARKER}')"
    ),
    esc(
        "ctypes_open_read",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.open(b'{CANARY_FILE}', 0)\nbuf = ctypes.create_string_buffer(200)\nlibc.read(fd, buf, 200)\nprint(fd, buf.value)",
    ),
    esc(
        "ctypes_raw_socket_syscall",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(41, 2, 1, 0), ctypes.get_errno())\nprint(libc.syscall(41, 0x100000002, 1, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_x32_socket",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(0x40000000 + 41, 2, 1, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_unshare_user",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.unshare(0x10000000), ctypes.get_errno())\nprint(libc.unshare(0x40000000), ctypes.get_errno())",
    ),
    esc(
        "ctypes_ptrace_parent",
        "native",
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())\nprint(libc.ptrace(16, {HOST_PID}, 0, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_process_vm_readv",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(64)\nclass iov(ctypes.Structure):\n    _fields_ = [('b', ctypes.c_void_p), ('n', ctypes.c_size_t)]\nl = iov(ctypes.cast(buf, ctypes.c_void_p), 64); r = iov(0x400000, 64)\nprint(libc.process_vm_readv({HOST_PID}, ctypes.byref(l), 1, ctypes.byref(r), 1, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_mount_proc",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.mount(b'proc', b'.', b'proc', 0, None), ctypes.get_errno())\nprint(libc.chroot(b'/'), ctypes.get_errno())",
    ),
    esc(
        "ctypes_io_uring_bpf",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfor nr in (425, 321, 323, 298, 250):  # io_uring_setup, bpf, userfaultfd, perf_event_open, keyctl\n    print(nr, libc.syscall(nr, 0, 0, 0, 0, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_execve",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nargv = (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', b'touch {MARKER}', None)\nprint(libc.execv(b'/bin/sh', argv), ctypes.get_errno())",
    ),
    esc(
        "ctypes_pidfd_getfd",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\npfd = libc.syscall(434, {SERVER_PID}, 0)\nprint(pfd, libc.syscall(438, pfd, 3, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_open_by_handle",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(304, -100, 0, 0), ctypes.get_errno())",
    ),
    esc(
        "ctypes_kexec_kills",
        "native",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(320, -1, -1, 0, 0, 0))",
    ),
    esc(
        "int80_socketcall",
        "native",
        "import ctypes, mmap\ncode = bytes([0xb8, 0x66, 0, 0, 0, 0xbb, 1, 0, 0, 0, 0x31, 0xc9, 0xcd, 0x80, 0xc3])  # i386 socketcall(SYS_SOCKET) via int 0x80\nm = mmap.mmap(-1, 4096, prot=7)\nm.write(code)\nf = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\nprint(f())",
    ),
    # ----------------------------------------------------------- gc walks
    esc(
        "gc_get_objects_os",
        "gc",
        "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict) and 'system' in o and 'getpid' in o:\n        o['system']('cat {CANARY_FILE} > {MARKER}'); break\nimport os\n_payload(os)",
    ),
    esc(
        "gc_referrers_builtins",
        "gc",
        "import gc\nfor o in gc.get_referrers(print):\n    if isinstance(o, dict) and '__import__' in o:\n        _payload(o['__import__']('os')); break",
    ),
    esc(
        "gc_find_module",
        "gc",
        "import gc\nmods = [o for o in gc.get_objects() if type(o).__name__ == 'module' and getattr(o, '__name__', '') == 'posix']\n_payload(mods[0] if mods else __import__('posix'))",
    ),
    esc(
        "gc_find_socket",
        "gc",
        "import gc\nsocks = [o for o in gc.get_objects() if type(o).__name__ == 'socket']\nfor s in socks:\n    try:\n        s.sendall(b'\\x00' * 64)\n    except Exception as e:\n        print(e)\n_payload(__import__('os'))",
    ),
    # --------------------------------------------------- audit-hook bypass
    esc(
        "posixsubprocess_fork_exec",
        "audit_bypass",
        "import _posixsubprocess, os\nr, w = os.pipe()\nprint(_posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'touch {MARKER}'], [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False))",
    ),
    esc(
        "os_posix_spawn",
        "audit_bypass",
        "import os\nprint(os.posix_spawn('/bin/sh', ['sh', '-c', 'touch {MARKER}'], {}))",
    ),
    esc(
        "os_execv",
        "audit_bypass",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'cat {CANARY_FILE}; touch {MARKER}'])",
    ),
    esc(
        "sys_addaudithook_noop",
        "audit_bypass",
        "import sys\nsys.addaudithook(lambda *a: None)\nimport os\n_payload(os)",
    ),
    # ---------------------------------------------------------- debuggers
    esc("breakpoint_call", "debuggers", "breakpoint()\nimport os\n_payload(os)"),
    esc("pdb_run", "debuggers", "import pdb\npdb.run('import os; os.system(\"touch {MARKER}\")')"),
    esc("code_interact", "debuggers", "import code\ncode.interact(local={'x': 1})\nimport os\n_payload(os)"),
    esc(
        "sys_settrace_hook", "debuggers", "import sys\nsys.settrace(lambda *a: None)\nimport os\n_payload(os)"
    ),
    # ----------------------------------------------------- loader imports
    esc(
        "importlib_machinery_loader",
        "loaders",
        "import importlib.machinery as m\nspec = m.PathFinder.find_spec('os')\nmod = spec.loader.load_module('os')\n_payload(mod)",
    ),
    esc(
        "sourcefileloader_path",
        "loaders",
        "import importlib.machinery as m, sys\nl = m.SourceFileLoader('osx', sys.modules['os'].__file__)\n_payload(l.load_module())",
    ),
    esc(
        "frozen_importer",
        "loaders",
        "import _frozen_importlib as f\n_payload(f.BuiltinImporter.load_module('posix'))",
    ),
    esc(
        "spec_from_loader_exec",
        "loaders",
        "import importlib.util as u\nspec = u.find_spec('subprocess')\nmod = u.module_from_spec(spec)\nspec.loader.exec_module(mod)\n_popen(mod.Popen)",
    ),
    esc(
        "zipimport_write",
        "loaders",
        "import zipfile, zipimport\nwith zipfile.ZipFile('evil.zip', 'w') as z:\n    z.writestr('evil.py', 'import os\\nos.system(\"touch {MARKER}\")')\nzipimport.zipimporter('evil.zip').load_module('evil')",
    ),
    esc("dunder_loader", "loaders", "import json\n_payload(json.__loader__.load_module('os'))"),
    # -------------------------------------------------------- secret theft
    esc(
        "environ_dump",
        "secrets",
        "import os\nprint(dict(os.environ))\nprint(os.environ.get('RLM_TEST_SECRET_TOKEN'))",
    ),
    esc("proc_self_environ", "secrets", "print(open('/proc/self/environ', 'rb').read())"),
    esc(
        "proc_ppid_environ", "secrets", "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())"
    ),
    esc("proc_host_environ", "secrets", "print(open('/proc/{HOST_PID}/environ', 'rb').read())"),
    esc(
        "proc_host_cmdline",
        "secrets",
        "print(open('/proc/{HOST_PID}/cmdline', 'rb').read())\nprint(open('/proc/{SERVER_PID}/cmdline', 'rb').read())",
    ),
    esc("proc_host_mem", "secrets", "f = open('/proc/{HOST_PID}/mem', 'rb')\nprint(f.read(100))"),
    esc(
        "proc_scan_all",
        "secrets",
        "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n        try:\n            print(open(f'/proc/{p}/environ', 'rb').read())\n        except Exception as e:\n            pass",
    ),
    esc("canary_file_open", "secrets", "print(open('{CANARY_FILE}').read())"),
    esc(
        "canary_file_os_open",
        "secrets",
        "import os\nfd = os.open('{CANARY_FILE}', os.O_RDONLY)\nprint(os.read(fd, 100))",
    ),
    esc("key_file_home_config", "secrets", "print(open('{KEY_FILE}').read())"),
    esc("root_home_listing", "secrets", "import os\nprint(os.listdir('/root'), os.listdir('/root/.config'))"),
    esc("etc_shadow", "secrets", "print(open('/etc/shadow').read())"),
    esc(
        "symlink_out_of_scratch",
        "secrets",
        "import os\nos.symlink('{CANARY_FILE}', 'link')\nprint(open('link').read())",
    ),
    esc(
        "hardlink_out_of_scratch",
        "secrets",
        "import os\nos.link('{CANARY_FILE}', 'hl')\nprint(open('hl').read())",
    ),
    esc("open_dev_mem", "secrets", "print(open('/dev/mem', 'rb').read(10))"),
    esc(
        "scratch_parent_walk",
        "secrets",
        "import os\nprint(os.listdir('..'))\nprint(open('../../' + '{CANARY_FILE}'.lstrip('/')).read())",
    ),
    # ------------------------------------------------------------- writes
    esc("write_tmp", "writes", "open('{MARKER}', 'w').write('x')"),
    esc(
        "write_via_os",
        "writes",
        "import os\nfd = os.open('{MARKER}', os.O_CREAT | os.O_WRONLY)\nos.write(fd, b'x')",
    ),
    esc("rename_into_host", "writes", "import os\nopen('f', 'w').write('x')\nos.rename('f', '{MARKER}')"),
    esc("write_etc", "writes", "open('/etc/rlm-pwned', 'w').write('x')"),
    esc("mkfifo_outside", "writes", "import os\nos.mkfifo('{MARKER}')"),
    esc(
        "chmod_canary",
        "writes",
        "import os\nos.chmod('{CANARY_FILE}', 0o777)\nprint(open('{CANARY_FILE}').read())",
    ),
    esc("truncate_canary", "writes", "import os\nos.truncate('{CANARY_FILE}', 0)"),
    esc("unlink_canary", "writes", "import os\nos.unlink('{CANARY_FILE}')"),
    esc("utime_outside", "writes", "import os\nos.utime('{CANARY_FILE}', (0, 0))"),
    # ----------------------------------------------------------- network
    esc(
        "tcp_connect_loopback",
        "network",
        "import socket\ns = socket.create_connection(('127.0.0.1', {TCP_PORT}), timeout=2)\ns.sendall(b'hello')",
    ),
    esc(
        "udp_sendto_loopback",
        "network",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'exfil', ('127.0.0.1', {UDP_PORT}))",
    ),
    esc(
        "tcp6_connect",
        "network",
        "import socket\ns = socket.socket(socket.AF_INET6)\ns.connect(('::1', {TCP_PORT}))",
    ),
    esc("dns_lookup", "network", "import socket\nprint(socket.getaddrinfo('example.com', 80))"),
    esc(
        "abstract_unix_connect",
        "network",
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{UNIX_NAME}')\ns.sendall(b'x')",
    ),
    esc("unix_socketpair", "network", "import socket\na, b = socket.socketpair()\nprint(a, b)"),
    esc(
        "raw_packet_socket",
        "network",
        "import socket\nprint(socket.socket(socket.AF_PACKET, socket.SOCK_RAW))",
    ),
    esc(
        "netlink_socket",
        "network",
        "import socket\nprint(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))",
    ),
    esc(
        "tcp_bind_listen",
        "network",
        "import socket\ns = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()\nprint(s.getsockname())",
    ),
    esc(
        "urllib_fetch",
        "network",
        "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{TCP_PORT}/', timeout=2).read())",
    ),
    esc("vsock_socket", "network", "import socket\nprint(socket.socket(40, socket.SOCK_STREAM))"),
    esc("bluetooth_socket", "network", "import socket\nprint(socket.socket(31, socket.SOCK_STREAM))"),
    # ------------------------------------------------------------ signals
    esc("kill_parent", "signals", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"),
    esc("kill_host", "signals", "import os, signal\nos.kill({HOST_PID}, signal.SIGTERM)"),
    esc(
        "killpg_host_group", "signals", "import os, signal\nos.killpg(os.getpgid({HOST_PID}), signal.SIGTERM)"
    ),
    esc("kill_all_minus_one", "signals", "import os, signal\nos.kill(-1, signal.SIGKILL)"),
    esc("kill_server_group", "signals", "import os, signal\nos.killpg({SERVER_PID}, signal.SIGKILL)"),
    esc(
        "pidfd_send_signal_host",
        "signals",
        "import os, signal\nfd = os.pidfd_open({HOST_PID})\nsignal.pidfd_send_signal(fd, signal.SIGKILL)",
    ),
    esc("sigqueue_host_stop", "signals", "import os, signal\nos.kill({HOST_PID}, signal.SIGSTOP)"),
    esc(
        "tgkill_server",
        "signals",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(234, {SERVER_PID}, {SERVER_PID}, 9), ctypes.get_errno())",
    ),
    # ------------------------------------------------------------ resources
    Attack("cpu_while_true", "cpu", "while True:\n    pass", "limit:cpu"),
    Attack("cpu_big_power", "cpu", "x = 10 ** 10 ** 10", "limit:cpu"),
    Attack("cpu_catastrophic_regex", "cpu", "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')", "limit:cpu"),
    Attack(
        "cpu_ignore_sigxcpu",
        "cpu",
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
        "limit:cpu",
    ),
    Attack("wall_sleep_forever", "wall", "import time\ntime.sleep(1e9)", "limit:wall"),
    Attack(
        "wall_ignore_sigterm",
        "wall",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(1e9)",
        "limit:wall",
    ),
    Attack(
        "wall_blocking_read", "wall", "import os\nos.read(0, 1)\nimport time\ntime.sleep(1e9)", "limit:wall"
    ),
    Attack("memory_bytearray", "memory", "x = bytearray(4 << 30)", "limit:memory"),
    Attack(
        "memory_list_growth", "memory", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))", "limit:memory"
    ),
    Attack(
        "memory_memfd_pages",
        "memory",
        "import os\nfds = []\nfor i in range(60):\n    fd = os.memfd_create('x')\n    fds.append(fd)\n    chunk = b'\\0' * (1 << 20)\n    for j in range(63):\n        os.write(fd, chunk)",
        "limit:memory",
    ),
    Attack(
        "recursion_c_level",
        "recursion",
        "import sys\nsys.setrecursionlimit(10 ** 9)\ndef f(n):\n    return f(n + 1)\nf(0)",
        "crash_or_error",
    ),
    Attack("recursion_nested_eval", "recursion", "eval('(' * 200000 + ')' * 200000)", "crash_or_error"),
    Attack(
        "recursion_deep_json",
        "recursion",
        "import json\njson.loads('[' * 10 ** 6 + ']' * 10 ** 6)",
        "crash_or_error",
    ),
    Attack("fork_bomb", "processes", "import os\nwhile True:\n    os.fork()", "limit:processes"),
    Attack(
        "thread_bomb",
        "processes",
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()",
        "limit:processes",
    ),
    Attack(
        "vfork_posix_spawn_bomb",
        "processes",
        "import os\nwhile True:\n    os.posix_spawn('/bin/true', ['true'], {})",
        "processes_or_denied",
    ),
    Attack(
        "disk_many_small_files",
        "disk",
        "for i in range(10 ** 6):\n    open(f'f{i}', 'w').write('x' * 10)",
        "limit:disk",
    ),
    Attack(
        "disk_big_file",
        "disk",
        "f = open('big', 'wb')\nfor i in range(10 ** 4):\n    f.write(b'\\0' * (1 << 20))",
        "limit:disk",
    ),
    Attack(
        "disk_many_mid_files",
        "disk",
        "for i in range(10 ** 4):\n    open(f'm{i}', 'wb').write(b'\\0' * (60 << 20))",
        "limit:disk",
    ),
]
