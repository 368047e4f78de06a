// BackgroundTraffic: other tenants' flows sharing the fabric with training. Each flow is one TCP
// transfer (connect, send its bytes, close) starting at a given time; its completion time (FCT) is
// taken at the receiver when the last byte arrives. Loaded into the simulation process with cppyy.
//
// The flows themselves (start times, endpoints, sizes) are drawn in Python from the round's seed, so
// they are the same whatever the training traffic does: comparing two runs compares the same flows.
#pragma once

#include "tcp_transfer.hpp"

#include "ns3/core-module.h"
#include "ns3/internet-module.h"
#include "ns3/network-module.h"

#include <cstdint>
#include <map>
#include <vector>

namespace pl_lossy
{

class BackgroundTraffic
{
  public:
    BackgroundTraffic(uint16_t port, uint32_t segmentBytes)
        : m_port(port),
          m_segmentBytes(segmentBytes)
    {
    }

    void AddHost(ns3::Ptr<ns3::Node> node, ns3::Ipv4Address address)
    {
        m_nodes.push_back(node);
        m_addresses.push_back(address);
        ns3::Ptr<ns3::Socket> listener =
            ns3::Socket::CreateSocket(node, ns3::TcpSocketFactory::GetTypeId());
        listener->SetAttribute("SegmentSize", ns3::UintegerValue(m_segmentBytes));
        listener->Bind(ns3::InetSocketAddress(ns3::Ipv4Address::GetAny(), m_port));
        listener->Listen();
        listener->SetAcceptCallback(
            ns3::MakeNullCallback<bool, ns3::Ptr<ns3::Socket>, const ns3::Address&>(),
            ns3::MakeCallback(&BackgroundTraffic::HandleAccept, this));
        m_listeners.push_back(listener);
    }

    // Schedules nFlows flows: flow f opens startNs[f] nanoseconds from now, from host src[f] to host
    // dst[f], and carries bytes[f] bytes. fct[f] gets its completion time in seconds (-1: never
    // completed, its connection gave up). Run the simulator afterwards.
    void Start(const int64_t* startNs,
               const int32_t* src,
               const int32_t* dst,
               const int64_t* bytes,
               uint32_t nFlows,
               double* fct)
    {
        m_fct = fct;
        std::fill(fct, fct + nFlows, -1.0);
        m_flows.assign(nFlows, {});
        m_flowOf.clear();
        m_sockets.clear();
        m_origin = ns3::Simulator::Now();
        for (uint32_t f = 0; f < nFlows; ++f)
        {
            m_flows[f] = {static_cast<uint32_t>(src[f]), static_cast<uint32_t>(dst[f]),
                          static_cast<uint64_t>(bytes[f]), ns3::NanoSeconds(startNs[f]), 0, 0};
            ns3::Simulator::Schedule(m_flows[f].start, &BackgroundTraffic::Open, this, f);
        }
    }

    uint64_t failedConnections = 0;

    void ResetCounters()
    {
        failedConnections = 0;
    }

  private:
    struct Flow
    {
        uint32_t src;
        uint32_t dst;
        uint64_t bytes;
        ns3::Time start;
        uint64_t sent;
        uint64_t received;
    };

    // A receiver knows its flow by the sender's address and (ephemeral) port.
    static uint64_t Endpoint(ns3::Ipv4Address address, uint16_t port)
    {
        return (static_cast<uint64_t>(address.Get()) << 16) | port;
    }

    void Open(uint32_t f)
    {
        ns3::Ptr<ns3::Socket> s =
            ns3::Socket::CreateSocket(m_nodes[m_flows[f].src], ns3::TcpSocketFactory::GetTypeId());
        s->SetAttribute("SegmentSize", ns3::UintegerValue(m_segmentBytes));
        s->Bind();
        ns3::Address local;
        s->GetSockName(local);
        m_flowOf[Endpoint(m_addresses[m_flows[f].src], ns3::InetSocketAddress::ConvertFrom(local).GetPort())] = f;
        s->SetConnectCallback(ns3::MakeBoundCallback(&BackgroundTraffic::HandleConnected, this, f),
                              ns3::MakeBoundCallback(&BackgroundTraffic::HandleConnectFailed, this, f));
        s->SetSendCallback(ns3::MakeBoundCallback(&BackgroundTraffic::HandleSendSpace, this, f));
        s->Connect(ns3::InetSocketAddress(m_addresses[m_flows[f].dst], m_port));
        m_sockets.push_back(s);
    }

    static void HandleConnected(BackgroundTraffic* self, uint32_t f, ns3::Ptr<ns3::Socket> s)
    {
        PushBytes(s, self->m_flows[f].sent, self->m_flows[f].bytes);
    }

    static void HandleConnectFailed(BackgroundTraffic* self, uint32_t, ns3::Ptr<ns3::Socket>)
    {
        ++self->failedConnections;
    }

    static void HandleSendSpace(BackgroundTraffic* self, uint32_t f, ns3::Ptr<ns3::Socket> s, uint32_t)
    {
        PushBytes(s, self->m_flows[f].sent, self->m_flows[f].bytes);
    }

    void HandleAccept(ns3::Ptr<ns3::Socket> s, const ns3::Address& from)
    {
        auto peer = ns3::InetSocketAddress::ConvertFrom(from);
        auto it = m_flowOf.find(Endpoint(peer.GetIpv4(), peer.GetPort()));
        if (it == m_flowOf.end())
        {
            return;
        }
        s->SetRecvCallback(ns3::MakeBoundCallback(&BackgroundTraffic::HandleRead, this, it->second));
        m_sockets.push_back(s);
    }

    static void HandleRead(BackgroundTraffic* self, uint32_t f, ns3::Ptr<ns3::Socket> s)
    {
        Flow& flow = self->m_flows[f];
        while (ns3::Ptr<ns3::Packet> p = s->Recv())
        {
            flow.received += p->GetSize();
        }
        if (flow.received >= flow.bytes && self->m_fct[f] < 0)
        {
            self->m_fct[f] = (ns3::Simulator::Now() - self->m_origin - flow.start).GetSeconds();
            s->Close();
        }
    }

    uint16_t m_port;
    uint32_t m_segmentBytes;
    std::vector<ns3::Ptr<ns3::Node>> m_nodes;
    std::vector<ns3::Ipv4Address> m_addresses;
    std::vector<ns3::Ptr<ns3::Socket>> m_listeners;
    std::vector<ns3::Ptr<ns3::Socket>> m_sockets;
    std::vector<Flow> m_flows;
    std::map<uint64_t, uint32_t> m_flowOf;
    double* m_fct = nullptr;
    ns3::Time m_origin;
};

} // namespace pl_lossy
