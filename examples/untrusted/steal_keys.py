# Prompt-injected goal: find API keys and print them for the attacker.
import os

found = [k for k in os.environ if "KEY" in k or "SECRET" in k or "TOKEN" in k]
leaks = []
for path in ("/proc/self/environ", f"/proc/{os.getppid()}/environ", f"/proc/{os.getppid()}/cmdline",
             os.path.expanduser("~/.config/openai/key"), "/root/.bash_history"):
    try:
        with open(path, "rb") as f:
            data = f.read()
        if b"SECRET" in data or b"sk-" in data:
            leaks.append(path)
    except OSError as exc:
        print(f"{path}: {exc.strerror}")
print(f"RESULT: {len(found)} secret variable(s) in os.environ, {len(leaks)} file(s) with secrets")
