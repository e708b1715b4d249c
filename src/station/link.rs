//! The MQTT link task.
