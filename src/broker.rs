//! The embedded MQTT broker of `pointgate demo` (rumqttd, in-process, loopback only).
