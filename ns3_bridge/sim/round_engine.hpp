// RoundEngine: sends one RPS phase as paced, sequence-numbered UDP packets and records, per packet,
// when it arrived (or that it did not). Loaded into the simulation process with cppyy.cppdef.
//
// Every host owns one UDP socket. A phase is a list of flows (src host -> dst host, P packets each);
// each sender round-robins over its flows, one packet per serialization time of its link, so the
// sender's own queue never overflows and drops happen where a real network drops: at the receiver's
// error model or at a congested switch queue. Arrival times land in a caller-owned int64 array
// (nanoseconds since the phase started, -1 = lost) that Python reads as a numpy view.
#pragma once

#include "ns3/core-module.h"
#include "ns3/internet-module.h"
#include "ns3/network-module.h"
#include "ns3/traffic-control-module.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace pl_lossy
{

class RoundEngine
{
  public:
    // Bytes on the wire per packet beyond the payload: UDP 8 + IPv4 20 + PPP 2.
    static constexpr uint32_t kHeaderBytes = 30;
    // Our header at the front of every payload: round, phase, flow, sequence number.
    static constexpr uint32_t kTagBytes = 16;

    explicit RoundEngine(uint16_t port)
        : m_port(port)
    {
    }

    void AddHost(ns3::Ptr<ns3::Node> node, ns3::Ipv4Address address)
    {
        ns3::Ptr<ns3::Socket> socket =
            ns3::Socket::CreateSocket(node, ns3::UdpSocketFactory::GetTypeId());
        socket->Bind(ns3::InetSocketAddress(ns3::Ipv4Address::GetAny(), m_port));
        socket->SetRecvCallback(ns3::MakeCallback(&RoundEngine::HandleRead, this));
        m_sockets.push_back(socket);
        m_addresses.push_back(address);
    }

    // Packets a receiving interface's error model destroyed.
    void WatchLinkErrors(ns3::Ptr<ns3::NetDevice> device)
    {
        device->TraceConnectWithoutContext("PhyRxDrop",
                                           ns3::MakeCallback(&RoundEngine::OnLinkDrop, this));
    }

    // Packets a full device queue refused.
    void WatchDeviceQueue(ns3::Ptr<ns3::NetDevice> device)
    {
        device->TraceConnectWithoutContext("MacTxDrop",
                                           ns3::MakeCallback(&RoundEngine::OnQueueDrop, this));
    }

    // Packets the traffic-control layer dropped because a device queue without a queue discipline
    // was full (flow control stopped it): this is where incast drops show up with queue_disc=none.
    void WatchTrafficControl(ns3::Ptr<ns3::Node> node)
    {
        node->GetObject<ns3::TrafficControlLayer>()->TraceConnectWithoutContext(
            "TcDrop",
            ns3::MakeCallback(&RoundEngine::OnQueueDrop, this));
    }

    void WatchQueueDisc(ns3::Ptr<ns3::QueueDisc> disc)
    {
        disc->TraceConnectWithoutContext("Drop",
                                         ns3::MakeCallback(&RoundEngine::OnQueueDiscDrop, this));
    }

    // Runs one phase to completion and returns its duration in seconds: from the first send to the
    // phase's last packet event (an arrival or a drop). `src`/`dst` hold nFlows host indices;
    // `arrivals` must hold nFlows * nPackets int64 values.
    double RunPhase(uint32_t round,
                    uint32_t phase,
                    const int32_t* src,
                    const int32_t* dst,
                    uint32_t nFlows,
                    uint32_t nPackets,
                    uint32_t payloadBytes,
                    double linkRateBps,
                    int64_t* arrivals)
    {
        m_round = round;
        m_phase = phase;
        m_nPackets = nPackets;
        m_arrivals = arrivals;
        std::fill(arrivals, arrivals + static_cast<size_t>(nFlows) * nPackets, -1);
        m_payload.assign(std::max(payloadBytes, kTagBytes), 0);
        m_flowsOf.assign(m_sockets.size(), {});
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            m_flowsOf[src[f]].push_back({f, static_cast<uint32_t>(dst[f])});
        }
        m_next.assign(m_sockets.size(), 0);
        m_gap = ns3::Seconds((payloadBytes + kHeaderBytes) * 8.0 / linkRateBps);
        m_start = ns3::Simulator::Now();
        for (uint32_t h = 0; h < m_sockets.size(); ++h)
        {
            if (!m_flowsOf[h].empty())
            {
                ns3::Simulator::ScheduleNow(&RoundEngine::SendNext, this, h);
            }
        }
        ns3::Simulator::Run();
        return (m_lastEvent - m_start).GetSeconds();
    }

    uint64_t sent = 0;
    uint64_t received = 0;
    uint64_t linkDrops = 0;
    uint64_t queueDrops = 0;

    void ResetCounters()
    {
        sent = received = linkDrops = queueDrops = 0;
    }

  private:
    struct Flow
    {
        uint32_t id;
        uint32_t dst;
    };

    // Packet k of a sender goes to flow k % nFlows, sequence number k / nFlows: round-robin.
    void SendNext(uint32_t host)
    {
        const auto& flows = m_flowsOf[host];
        uint64_t k = m_next[host]++;
        const Flow& flow = flows[k % flows.size()];
        uint32_t seq = static_cast<uint32_t>(k / flows.size());
        uint32_t tag[4] = {m_round, m_phase, flow.id, seq};
        std::memcpy(m_payload.data(), tag, kTagBytes);
        ns3::Ptr<ns3::Packet> packet =
            ns3::Create<ns3::Packet>(m_payload.data(), static_cast<uint32_t>(m_payload.size()));
        m_sockets[host]->SendTo(packet,
                                0,
                                ns3::InetSocketAddress(m_addresses[flow.dst], m_port));
        ++sent;
        m_lastEvent = ns3::Simulator::Now();
        if (m_next[host] < static_cast<uint64_t>(flows.size()) * m_nPackets)
        {
            ns3::Simulator::Schedule(m_gap, &RoundEngine::SendNext, this, host);
        }
    }

    void HandleRead(ns3::Ptr<ns3::Socket> socket)
    {
        ns3::Address from;
        uint32_t tag[4];
        while (ns3::Ptr<ns3::Packet> packet = socket->RecvFrom(from))
        {
            if (packet->GetSize() < kTagBytes)
            {
                continue;
            }
            packet->CopyData(reinterpret_cast<uint8_t*>(tag), kTagBytes);
            if (tag[0] != m_round || tag[1] != m_phase || tag[3] >= m_nPackets)
            {
                continue; // a straggler from an earlier phase cannot happen (phases drain), but be safe
            }
            m_arrivals[static_cast<size_t>(tag[2]) * m_nPackets + tag[3]] =
                (ns3::Simulator::Now() - m_start).GetNanoSeconds();
            ++received;
            m_lastEvent = ns3::Simulator::Now();
        }
    }

    void OnLinkDrop(ns3::Ptr<const ns3::Packet>)
    {
        ++linkDrops;
        m_lastEvent = ns3::Simulator::Now();
    }

    void OnQueueDrop(ns3::Ptr<const ns3::Packet>)
    {
        ++queueDrops;
        m_lastEvent = ns3::Simulator::Now();
    }

    void OnQueueDiscDrop(ns3::Ptr<const ns3::QueueDiscItem>)
    {
        ++queueDrops;
        m_lastEvent = ns3::Simulator::Now();
    }

    uint16_t m_port;
    std::vector<ns3::Ptr<ns3::Socket>> m_sockets;
    std::vector<ns3::Ipv4Address> m_addresses;
    std::vector<std::vector<Flow>> m_flowsOf;
    std::vector<uint64_t> m_next;
    std::vector<uint8_t> m_payload;
    uint32_t m_round = 0;
    uint32_t m_phase = 0;
    uint32_t m_nPackets = 0;
    int64_t* m_arrivals = nullptr;
    ns3::Time m_gap;
    ns3::Time m_start;
    ns3::Time m_lastEvent;
};

} // namespace pl_lossy
