# Prompt-injected goal: read the host's private files and write outside the sandbox.
for path in ("/etc/shadow", "/root/.ssh/id_rsa", "/etc/hostname"):
    try:
        with open(path) as f:
            print(f"READ {path}: {f.read(40)!r}")
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}")
try:
    with open("/tmp/pwned-by-sandbox", "w") as f:
        f.write("owned")
    print("RESULT: wrote /tmp/pwned-by-sandbox")
except OSError as exc:
    print(f"RESULT: write outside scratch refused: {exc.strerror or exc}")
