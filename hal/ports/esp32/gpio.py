# ESP32 GPIO: machine.Pin by board pin name. The esp32 port's pin interrupts are always
# soft: its ISR queues the handler with micropython.schedule, so it never runs in the
# ISR (and its Pin.irq() takes no `hard` argument: TypeError).
from hal.ports.machine.gpio import Pin
