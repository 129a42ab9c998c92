# Resource attack: spin forever (and ignore the polite signals).
import signal

for sig in (signal.SIGTERM, signal.SIGXCPU):
    signal.signal(sig, signal.SIG_IGN)
while True:
    pass
