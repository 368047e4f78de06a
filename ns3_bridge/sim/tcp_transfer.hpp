// Shared by the TCP engines: hand a socket one transfer's bytes as fast as its send buffer takes them.
#pragma once

#include "ns3/network-module.h"

#include <algorithm>
#include <cstdint>

namespace pl_lossy
{

// Gives `s` as much of the transfer's remaining bytes as its send buffer has room for (`sent` counts
// what it took so far); once all `total` bytes are handed over, closes it (the FIN follows the data).
// Call it when the connection is up and again from the socket's send callback.
inline void PushBytes(ns3::Ptr<ns3::Socket> s, uint64_t& sent, uint64_t total)
{
    while (sent < total)
    {
        uint32_t room = s->GetTxAvailable();
        if (room == 0)
        {
            return;
        }
        uint32_t chunk = static_cast<uint32_t>(std::min<uint64_t>({total - sent, room, 65536}));
        int taken = s->Send(ns3::Create<ns3::Packet>(chunk));
        if (taken <= 0)
        {
            return;
        }
        sent += static_cast<uint64_t>(taken);
    }
    s->Close();
}

} // namespace pl_lossy
